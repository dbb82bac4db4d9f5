import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels are tested in Triton's interpreter; the switch is read when a
# kernel module is imported, so it must be set before any test imports `kernels`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A fused-path kernel that raises is left for PyTorch in users' runs (dispatch.guarded); in the tests it raises,
# so a bug in a fast path fails them instead of hiding behind the fallback.
os.environ.setdefault("QUANTSPARSE_STRICT_KERNELS", "1")

ROOT = Path(__file__).resolve().parents[1]
# QS_TEST_INSTALLED=1 tests the pip-installed packages (run `pytest`, not `python -m pytest`, from
# outside the checkout's root so that nothing puts the checkout on sys.path).
if os.environ.get("QS_TEST_INSTALLED", "0") in ("", "0") and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import quantsparse_core.dispatch  # noqa: E402,F401  (makes the kernels importable as quantsparse_kernels)

# Under pytest-xdist (./run tests: one worker per core) each worker gets its share of the cores, so the
# workers do not oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture
def rng():
    """A fresh, unseeded-by-default generator: inputs differ on every run unless QS_TEST_SEED is set."""
    seed = int(os.environ.get("QS_TEST_SEED", torch.seed() % (2**31)))
    print(f"QS_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_thread():
    """Tiny tensors: thread hand-offs cost more than the math (5x on a busy 2-core box). Use it in a module with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def embedded():
    """The shipped tiny model (float32, CPU) and its header, loaded once per test process."""
    from quantsparse_core.models.tiny.embedded import load_embedded
    return load_embedded()


def pytest_collection_modifyitems(items):
    """Test files that set RUN_FIRST = True (the suite's longest: the tiny model's prompt-agreement runs) are
    handed out first, so the pytest-xdist workers of ./run tests finish together instead of one long file last."""
    items.sort(key=lambda item: not getattr(getattr(item, "module", None), "RUN_FIRST", False))
