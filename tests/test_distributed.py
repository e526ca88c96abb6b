"""Sharding under torchrun: the runtime's rank helpers, and a 2-process gloo `itd nll` equal to one process."""

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import itdcli
from itdcli import runtime
from itdcli.evaluation import engine

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
LAUNCH_TIMEOUT_S = 60
needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


@pytest.fixture
def single(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain process: none of torchrun's variables."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread, as torchrun gives each rank (OMP_NUM_THREADS=1), so float sums round alike."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run torchrun with two CPU ranks and one thread each; fail with both ranks' output if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [*TORCHRUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def json_documents(text: str) -> list[dict[str, object]]:
    """Every JSON object printed on stdout, one per rank that printed."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) >= 0:
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)
    return docs


def test_a_single_process_is_rank_0_of_1_and_collectives_are_identities(single: None) -> None:
    t = torch.arange(12.0).reshape(6, 2)
    assert (runtime.distributed(), runtime.rank(), runtime.world_size(), runtime.is_main()) == (False, 0, 1, True)
    assert runtime.local_device("cpu") == torch.device("cpu")
    assert torch.equal(runtime.shard(t), t)
    assert torch.equal(runtime.all_gather_rows(t), t)
    assert torch.equal(runtime.gather_shards(runtime.shard(t), 6), t)
    mean = runtime.all_reduce_mean(t)
    assert torch.equal(mean, t) and mean.data_ptr() != t.data_ptr()
    assert runtime.broadcast_object({"run": "x"}) == {"run": "x"}
    runtime.barrier()
    runtime.init_distributed(torch.device("cpu"))
    assert not dist.is_initialized()
    runtime.shutdown()


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n", [4, 7, 30])
def test_shards_cover_every_row_once_and_put_back_in_order(world: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    index = torch.randperm(100)[:n]
    parts = [runtime.shard_of(index, r) for r in range(world)]
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    positions = torch.cat([runtime.shard_of(torch.arange(n), r) for r in range(world)])
    assert torch.equal(torch.cat(parts)[positions.argsort()], index)


def test_under_torchrun_rank_comes_from_the_environment_and_collectives_need_a_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.distributed() and runtime.rank() == 1 and not runtime.is_main()
    assert runtime.local_device("cpu") == torch.device("cpu")
    assert engine.local_rows(torch.arange(5)).tolist() == [1, 3]
    assert engine.local_rows(torch.arange(1)).tolist() == [0]  # fewer images than ranks: every rank does all
    with pytest.raises(RuntimeError, match="init_distributed"):
        runtime.all_gather_rows(torch.zeros(3))


PRIMITIVES = """
import torch
from itdcli import runtime

runtime.init_distributed(torch.device("cpu"))
r, w = runtime.rank(), runtime.world_size()
assert w == 2 and runtime.is_main() == (r == 0)
rows = torch.full((3 + r, 2), float(r), dtype=torch.float64)  # uneven first dimensions
assert runtime.all_gather_rows(rows).tolist() == [[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 4
full = torch.arange(14, dtype=torch.float64).reshape(7, 2) / 3
assert torch.equal(runtime.gather_shards(runtime.shard(full), 7), full)
index = torch.tensor([5, 1, 9, 2, 8])
assert torch.equal(runtime.gather_shards(runtime.shard(index), 5), index)
assert runtime.all_reduce_mean(torch.tensor([float(r), 2.0])).tolist() == [0.5, 2.0]
assert runtime.broadcast_object(f"from rank {r}") == "from rank 0"
runtime.barrier()
runtime.shutdown()
open(f"rank{r}.ok", "w").write("ok")  # one file per rank: stdout of two ranks can interleave
"""


@needs_gloo
def test_gloo_primitives_gather_uneven_shards_in_order(tmp_path: Path) -> None:
    script = tmp_path / "primitives.py"
    script.write_text(textwrap.dedent(PRIMITIVES))
    launch([str(script)], tmp_path)
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]


@needs_gloo
def test_torchrun_nll_matches_a_single_process_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single: None, one_thread: None
) -> None:
    out = tmp_path / "ranks"
    monkeypatch.setenv("ITD_HOME", str(tmp_path / "home-ranks"))
    args = ["-m", "itdcli", "nll", "digits_test", "--model", "gaussian", "--limit", "30", "--points", "8"]
    proc = launch([*args, "--out", str(out), "--json"], tmp_path)
    printed = json_documents(proc.stdout)
    assert printed and all(doc["run_dir"] == str(out.resolve()) for doc in printed)

    monkeypatch.setenv("ITD_HOME", str(tmp_path / "home-single"))
    alone = itdcli.nll("digits_test", "gaussian", limit=30, points=8, out=tmp_path / "single")
    ranks, one = load_file(str(out / "arrays.safetensors")), load_file(str(tmp_path / "single" / "arrays.safetensors"))
    assert sorted(ranks) == sorted(one)
    assert any(k.startswith("bpd/") for k in ranks) and any(k.startswith("mse/") for k in ranks)
    for key in ranks:  # the evaluation is bitwise equal; the reference fit may differ in the last bit with threading
        torch.testing.assert_close(ranks[key], one[key], rtol=1e-12, atol=1e-12, msg=key)
    assert ranks["index"].tolist() == sorted(ranks["index"].tolist()) and len(ranks["index"]) == 30
    saved = json.loads((out / "result.json").read_text())
    for name, e in alone.model_dump()["estimates"].items():  # sums over ranks' rows may differ in the last bit
        assert saved["estimates"][name] == pytest.approx(e, rel=1e-12), name
    assert saved["data"]["n_images"] == 30 and saved["warnings"] == alone.warnings


@needs_gloo
def test_two_process_finetune_completes_and_writes_one_checkpoint(tmp_path: Path) -> None:
    """DDP over gloo: data sharded by DistributedSampler, losses all-reduced, only rank 0 writes; the run loads."""
    out = tmp_path / "run"
    arch = "iddpm:channels=32,res_blocks=1,mult=1,attn=none,heads=4,dropout=0.1"
    args = [
        "-m",
        "itdcli",
        "finetune",
        "--init",
        "scratch",
        "--arch",
        arch,
        "--data",
        "digits_train",
        "--out",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "16",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--json",
    ]
    proc = launch(args, tmp_path)
    docs = json_documents(proc.stdout)
    assert len(docs) == 1 and docs[0]["steps"] == 4
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    result = itdcli.nll("digits_test", str(out), limit=5, points=4, save=False)
    assert result.estimates["discrete"].bpd > 0


@needs_gloo
def test_two_process_finetune_with_periodic_evaluation_keeps_its_process_group(tmp_path: Path) -> None:
    """An nll evaluation inside a finetune joins no group of its own, so it must not leave the training's group."""
    out = tmp_path / "run"
    arch = "iddpm:channels=32,res_blocks=1,mult=1,attn=none,heads=4,dropout=0.1"
    args = ["-m", "itdcli", "finetune", "--init", "scratch", "--arch", arch, "--data", "digits_train",
            "--out", str(out), "--steps", "4", "--batch-size", "16", "--log-every", "1", "--device", "cpu",
            "--eval-data", "digits_test", "--eval-every", "2", "--eval-limit", "8", "--eval-points", "4",
            "--json"]  # fmt: skip
    proc = launch(args, tmp_path)
    assert json_documents(proc.stdout)[0]["steps"] == 4
    evals = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval" in e]
    assert [e["step"] for e in evals] == [2, 4]  # training went on after the first evaluation


@needs_gloo
def test_torchrun_solver_estimators_split_the_images_and_agree_with_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single: None, one_thread: None
) -> None:
    """vlb and ode solve each rank's images with no collective inside: no hang, every image once, same law."""
    args = ["nll", "digits_test", "--model", "gaussian", "--limit", "6", "--estimator", "all", "--points", "8"]
    args += ["--probes", "2", "--rtol", "1e-3", "--atol", "1e-3", "--target-stderr", "0.05"]
    out = tmp_path / "ranks"
    monkeypatch.setenv("ITD_HOME", str(tmp_path / "home-ranks"))
    launch(["-m", "itdcli", *args, "--out", str(out), "--json"], tmp_path)
    monkeypatch.setenv("ITD_HOME", str(tmp_path / "home-single"))
    alone = itdcli.nll("digits_test", "gaussian", **_options(args[4:]), save=False)
    saved = json.loads((out / "result.json").read_text())
    ranks = load_file(str(out / "arrays.safetensors"))
    for name in ("vlb", "ode"):
        assert ranks[f"bpd/{name}"].shape == (6,) and bool(torch.isfinite(ranks[f"bpd/{name}"]).all())
        a, b = saved["estimates"][name], alone.estimates[name]
        combined = (a["stderr_bpd"] ** 2 + b.stderr_bpd**2) ** 0.5
        assert abs(a["bpd"] - b.bpd) < 4 * combined + 1e-9, (name, a, b)


def _options(flags: list[str]) -> dict[str, object]:
    """`--name value` pairs as nll options (numbers parsed)."""
    pairs = zip(flags[::2], flags[1::2], strict=True)
    return {
        k[2:].replace("-", "_"): (v if v.isalpha() else float(v) if "e" in v or "." in v else int(v)) for k, v in pairs
    }
