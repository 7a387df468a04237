"""Control-plane stand-ins (kube-controller-manager, kube-scheduler, etcd) and the list+watch cache
they share with the kubelet. Everything goes through simnode.kubeclient, like the real components.
"""
