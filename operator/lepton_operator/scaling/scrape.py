"""The Prometheus scrape job for LeptonJob workers, as a real cluster needs it.

`scaling.prometheus` queries the labels this relabelling sets (`namespace`, `pod`,
`job_name`, `generation`); the chart's docs and the local Prometheus use the same text.
Print it with:

    python -c 'import yaml; from lepton_operator.scaling.scrape import scrape_config
    print(yaml.safe_dump([scrape_config()]))'
"""

from __future__ import annotations

from typing import Optional

SCRAPE_JOB = "lepton-trainer"


def scrape_config(
    api_server: Optional[str] = None,
    token_file: Optional[str] = None,
    ca_file: Optional[str] = None,
    insecure_skip_verify: bool = False,
    namespaces: Optional[list[str]] = None,
    scrape_interval: str = "15s",
) -> dict:
    """The scrape job for LeptonJob workers (a `scrape_configs` entry).

    In a cluster, leave `api_server`/`token_file`/`ca_file` unset: Prometheus then uses its
    in-cluster service account. The relabelling keeps pods annotated
    `prometheus.io/scrape: "true"`, scrapes `<podIP>:<prometheus.io/port>` at
    `prometheus.io/path` (default /metrics), and sets the labels `namespace`, `pod`,
    `job_name` and `generation` that `scaling.prometheus` queries rely on.
    """
    sd: dict = {"role": "pod"}
    if api_server:
        sd["api_server"] = api_server
        if token_file:
            sd["authorization"] = {"type": "Bearer", "credentials_file": token_file}
        tls: dict = {}
        if ca_file:
            tls["ca_file"] = ca_file
        if insecure_skip_verify:
            tls["insecure_skip_verify"] = True
        if tls:
            sd["tls_config"] = tls
    if namespaces:
        sd["namespaces"] = {"names": list(namespaces)}
    return {
        "job_name": SCRAPE_JOB,
        "scrape_interval": scrape_interval,
        "scrape_timeout": scrape_timeout(scrape_interval),
        "kubernetes_sd_configs": [sd],
        "relabel_configs": relabel_configs(),
    }


def relabel_configs() -> list[dict]:
    """Keep annotated running pods; scrape podIP:port; label namespace, pod, job_name, generation."""
    return [
        {"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"], "regex": "true", "action": "keep"},
        {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Pending|Succeeded|Failed", "action": "drop"},
        {
            "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"],
            "regex": "(.+)",
            "target_label": "__metrics_path__",
            "replacement": "$1",
        },
        {
            "source_labels": ["__meta_kubernetes_pod_ip", "__meta_kubernetes_pod_annotation_prometheus_io_port"],
            "regex": "(.+);([0-9]+)",
            "target_label": "__address__",
            "replacement": "$1:$2",
        },
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_label_lepton_ai_job_name"], "target_label": "job_name"},
        {"source_labels": ["__meta_kubernetes_pod_label_lepton_ai_generation"], "target_label": "generation"},
    ]


def scrape_timeout(interval: str) -> str:
    """Prometheus requires scrape_timeout <= scrape_interval; 10 s is its default."""
    units = {"s": 1, "m": 60, "h": 3600}
    return interval if float(interval[:-1]) * units[interval[-1]] <= 10 else "10s"
