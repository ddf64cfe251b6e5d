"""Launcher contract: torchrun argv from PET_*, env-settable args, exit codes."""

import pytest

from lepton_trainer import exitcodes
from lepton_trainer.__main__ import inside_torchrun, torchrun_argv
from lepton_trainer.config import parse_args

pytestmark = pytest.mark.unit


def test_standalone_without_pet_env():
    assert torchrun_argv(["--max-steps", "5"], {}) == [
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=1",
        "--module",
        "lepton_trainer.train",
        "--max-steps",
        "5",
    ]
    assert "--nproc-per-node=3" in torchrun_argv([], {"PET_NPROC_PER_NODE": "3"})


def test_pet_env_is_left_to_torchrun():
    env = {"PET_NNODES": "2", "PET_RDZV_ENDPOINT": "w0:29400", "PET_RDZV_BACKEND": "c10d"}
    assert torchrun_argv(["--synthetic"], env) == ["--module", "lepton_trainer.train", "--synthetic"]


def test_pet_env_reaches_torchrun_argparse(monkeypatch):
    pytest.importorskip("torch", reason="trainer tests need torch: pip install -e '.[trainer]'")
    from torch.distributed import run as torchrun

    for k, v in {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "1",
        "PET_RDZV_BACKEND": "c10d",
        "PET_RDZV_ENDPOINT": "127.0.0.1:29999",
        "PET_RDZV_ID": "uid-g3",
        "PET_MAX_RESTARTS": "0",
        "PET_RDZV_CONF": "is_host=1",
    }.items():
        monkeypatch.setenv(k, v)
    args = torchrun.parse_args(torchrun_argv(["--max-steps", "3"]))
    assert (args.nnodes, args.rdzv_id, args.rdzv_conf, args.max_restarts) == ("2", "uid-g3", "is_host=1", 0)
    assert args.module and args.training_script == "lepton_trainer.train"
    assert args.training_script_args == ["--max-steps", "3"]


def test_inside_torchrun():
    assert inside_torchrun({"LOCAL_RANK": "0"}) and not inside_torchrun({})


def test_args_from_env_and_cli_precedence():
    env = {
        "LEPTON_MAX_STEPS": "77",
        "LEPTON_LR": "0.5",
        "LEPTON_CHECKPOINT_DIR": "/ck",
        "POD_IP": "10.1.2.3",
        "LEPTON_METRICS_PORT": "9500",
        "LEPTON_SYNTHETIC": "true",
        "LEPTON_PACE_CURVE": '{"1": 10}',
    }
    cfg = parse_args([], env)
    assert (
        cfg.max_steps,
        cfg.lr,
        cfg.checkpoint_dir,
        cfg.metrics_addr,
        cfg.metrics_port,
        cfg.synthetic,
        cfg.pace_points(),
    ) == (77, 0.5, "/ck", "10.1.2.3", 9500, True, [(1.0, 10.0)])
    assert parse_args(["--max-steps", "5", "--no-synthetic"], env).max_steps == 5
    assert parse_args([], {}).metrics_addr == "0.0.0.0"


def test_hang_at_step_from_flag_or_env():
    assert parse_args([], {}).hang_at_step == 0
    assert parse_args([], {"LEPTON_HANG_AT_STEP": "7"}).hang_at_step == 7
    assert parse_args(["--hang-at-step", "9"], {"LEPTON_HANG_AT_STEP": "7"}).hang_at_step == 9


@pytest.mark.parametrize(
    "argv,env",
    [
        (["--max-steps", "0"], {}),
        ([], {"LEPTON_MAX_STEPS": "ten"}),
        (["--pace-curve", "{bad"], {}),
        ([], {"LEPTON_SYNTHETIC": "maybe"}),
        (["--hang-at-step", "-1"], {}),
    ],
)
def test_bad_input_exits_2(argv, env):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, env)
    assert exc.value.code == exitcodes.USAGE


@pytest.mark.parametrize(
    "codes,pod",
    [
        ([0, 0], 0),
        ([143, 143], 143),
        ([170, 3], 3),
        ([-9, 0], 137),
        ([0, -15], 143),
        ([170, 143], 143),
        ([170, 170], 170),
        ([170, -9], 137),
        ([-15, 137], 137),
        ([143, 170, 200], 200),
        ([172, 170], 172),  # rank 0 fenced: its peers' PEER_LOST is the consequence
        ([170, 173], 173),
    ],
)
def test_pod_exit_code_from_worker_codes(codes, pod):
    assert exitcodes.combine(codes) == pod


def test_dist_env_node_share_and_world_in_nodes():
    # lepton_trainer.train imports torch at module level
    pytest.importorskip("torch", reason="trainer tests need torch: pip install -e '.[trainer]'")
    from lepton_trainer.train import DistEnv

    env = DistEnv.from_environ(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "1",
            "GROUP_WORLD_SIZE": "2",
            "LEPTON_GENERATION": "5",
        }
    )
    assert (env.nodes, env.generation) == (2, 5)
    assert env.node_share(10) == 4 and env.node_share(7) == 3  # ranks 2,3: 2+2, 2+1
