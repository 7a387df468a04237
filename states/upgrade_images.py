"""upgrade_images: pull the images of the version being upgraded to (control plane, addons, binaries image)
while the old version runs, with the same progress events as `images`. Leaves them in the Docker Engine.
Done when each one is present and up to date (the `images` step's own check, for the target version)."""

from __future__ import annotations

from states.images import Images


class UpgradeImages(Images):
    """`images` for the target version: the engine hands every upgrade step a context whose cluster names it."""

    name = "upgrade_images"
