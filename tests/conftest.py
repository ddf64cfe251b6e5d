"""Shared pytest configuration: the local control-plane fixtures (local_cluster,
process_cluster, cluster, namespace, k8s, run_operator) come from the plugin below."""

pytest_plugins = ["lepton_operator.localcluster.pytest_plugin"]
