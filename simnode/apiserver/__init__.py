"""kube-apiserver stand-in: a Kubernetes API over HTTPS with client-certificate auth, backed by a JSON store.

Started by the kubelet stand-in as a static pod (`python -m simnode kube-apiserver --secure-port=...`); keeps its
objects under `<root>/var/lib/etcd/simnode-store/`.
"""
