"""Trainer arguments. Every flag ``--some-name`` can also be set as ``LEPTON_SOME_NAME``
in the environment (so a LeptonJob sets them through ``spec.env``); a flag on the command
line wins over the environment, which wins over the default.

Two settings keep the names the operator's contract uses: ``--checkpoint-dir`` reads
``LEPTON_CHECKPOINT_DIR`` and ``--metrics-addr`` reads ``POD_IP``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from .pace import parse_pace_curve

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _env_name(flag: str) -> str:
    return "LEPTON_" + flag.lstrip("-").replace("-", "_").upper()


def _env_bool(name: str, environ) -> bool:
    value = environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{name}={value!r} is not a boolean")


@dataclass(frozen=True)
class _Opt:
    flag: str
    type: type
    default: object
    help: str
    env: str | None = None  # defaults to LEPTON_<FLAG>


OPTIONS = [
    # training
    _Opt("--max-steps", int, 1000, "global steps to train; exit 0 once reached"),
    _Opt("--global-batch-size", int, 32, "samples per global step, whatever the world size"),
    _Opt("--micro-batch-size", int, 16, "most samples per forward pass on one rank (gradient accumulation above it)"),
    _Opt("--lr", float, 3e-3, "peak learning rate (AdamW)"),
    _Opt("--warmup-steps", int, 20, "linear warm-up steps before cosine decay"),
    _Opt("--min-lr-ratio", float, 0.1, "final LR as a fraction of --lr"),
    _Opt("--weight-decay", float, 0.01, "AdamW weight decay"),
    _Opt("--seed", int, 1234, "seed for model init and data order"),
    # model (defaults are tiny so that CPU runs are fast)
    _Opt("--n-layer", int, 2, "transformer blocks"),
    _Opt("--n-head", int, 4, "attention heads"),
    _Opt("--n-embd", int, 64, "embedding width"),
    _Opt("--block-size", int, 64, "context length in bytes (one sample = one block)"),
    # checkpoints
    _Opt("--checkpoint-dir", str, "", "where rank 0 writes checkpoints; unset = none", env="LEPTON_CHECKPOINT_DIR"),
    _Opt("--checkpoint-every-steps", int, 100, "checkpoint every N global steps (0 = off)"),
    _Opt("--checkpoint-every-seconds", float, 300.0, "checkpoint at least every T s (0 = off)"),
    _Opt("--keep-checkpoints", int, 3, "complete checkpoints kept (older ones deleted)"),
    # observability
    _Opt("--log-every-seconds", float, 10.0, "seconds between progress lines"),
    _Opt("--metrics-addr", str, "0.0.0.0", "metrics bind address", env="POD_IP"),
    _Opt("--metrics-port", int, 9400, "metrics port (0 = no metrics server)"),
    _Opt(
        "--positions-dir",
        str,
        "",
        "if set, every rank appends the sample positions and "
        "indices it consumes per step to positions-g<gen>-r<rank>.jsonl here (tests)",
    ),
    # fault injection
    _Opt(
        "--fail-at-step",
        int,
        0,
        "exit with --fail-exit-code on reaching this global step, before checkpointing it (0 = never)",
    ),
    _Opt("--fail-exit-code", int, 1, "exit code for --fail-at-step"),
    _Opt("--fail-rank", int, -1, "only this global rank fails (-1 = every rank)"),
    _Opt("--fail-generation", int, -1, "only fail in this LEPTON_GENERATION (-1 = any)"),
    _Opt(
        "--hang-at-step",
        int,
        0,
        "stop making progress on reaching this global step, staying alive: /metrics is still "
        "served (samples stop increasing) and SIGTERM still checkpoints and exits 143 (0 = never)",
    ),
    # synthetic workload and pacing
    _Opt("--synthetic-samples-per-second", float, 100.0, "--synthetic: emulated samples/s per node (pod)"),
    _Opt(
        "--pace-curve",
        str,
        "",
        "JSON {world size in pods: job samples/s}; each step sleeps so the job does not exceed the interpolated rate",
    ),
]


@dataclass(frozen=True)
class TrainConfig:
    """The parsed trainer settings (one attribute per option, plus ``synthetic``)."""

    max_steps: int
    global_batch_size: int
    micro_batch_size: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    seed: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    checkpoint_dir: str
    checkpoint_every_steps: int
    checkpoint_every_seconds: float
    keep_checkpoints: int
    log_every_seconds: float
    metrics_addr: str
    metrics_port: int
    positions_dir: str
    fail_at_step: int
    fail_exit_code: int
    fail_rank: int
    fail_generation: int
    hang_at_step: int
    synthetic_samples_per_second: float
    pace_curve: str
    synthetic: bool

    def pace_points(self) -> list[tuple[float, float]]:
        """The parsed --pace-curve (empty when unset)."""
        return parse_pace_curve(self.pace_curve) if self.pace_curve else []


def build_parser(environ=None) -> argparse.ArgumentParser:
    """The trainer's argument parser, with defaults taken from ``environ``."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m lepton_trainer",
        description="LeptonJob trainer. Every --flag is also settable as LEPTON_FLAG env.",
    )
    for opt in OPTIONS:
        env = opt.env or _env_name(opt.flag)
        default = opt.default
        if env in environ and environ[env] != "":
            try:
                default = opt.type(environ[env])
            except ValueError:
                parser.error(f"{env}={environ[env]!r} is not a valid {opt.type.__name__}")
        parser.add_argument(
            opt.flag, type=opt.type, default=default, help=f"{opt.help} [env {env}, default {opt.default!r}]"
        )
    try:
        synthetic_default = _env_bool("LEPTON_SYNTHETIC", environ)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    parser.add_argument(
        "--synthetic",
        action=argparse.BooleanOptionalAction,
        default=synthetic_default,
        help="no model: each step sleeps to emulate throughput [env LEPTON_SYNTHETIC]",
    )
    return parser


def parse_args(argv: list[str] | None = None, environ=None) -> TrainConfig:
    """Parse and validate trainer arguments; exits with code 2 on invalid input."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    problems = []
    if cfg.max_steps < 1:
        problems.append("--max-steps must be >= 1")
    if cfg.global_batch_size < 1 or cfg.micro_batch_size < 1:
        problems.append("--global-batch-size and --micro-batch-size must be >= 1")
    if cfg.n_embd % cfg.n_head:
        problems.append("--n-embd must be divisible by --n-head")
    if cfg.fail_at_step < 0 or cfg.hang_at_step < 0:
        problems.append("--fail-at-step and --hang-at-step must be >= 0")
    if cfg.keep_checkpoints < 1:
        problems.append("--keep-checkpoints must be >= 1")
    if cfg.synthetic_samples_per_second <= 0:
        problems.append("--synthetic-samples-per-second must be > 0")
    try:
        cfg.pace_points()
    except (ValueError, json.JSONDecodeError) as exc:
        problems.append(f"--pace-curve: {exc}")
    if problems:
        parser.error("; ".join(problems))
    return cfg
