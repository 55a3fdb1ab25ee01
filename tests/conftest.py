from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Ray reads this when it is first imported (whichever test does that first): under `uv run pytest` its workers
# would otherwise get a copy of the checkout with a freshly built virtual environment in it, 6 GB per session
os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
# ONNX exports and head arrays go to $XDG_CACHE_HOME/headmaster: one throwaway cache per test session
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="hm-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)
sys.path.insert(0, str(Path(__file__).parent))

from helpers import build_clip, build_dinov2, build_siglip, build_timm, fill_bucket  # noqa: E402

from headmaster.embedding import Context, EmbedOptions, add_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def builtin_cache(tmp_path_factory) -> Path:
    """The built-in backbone is converted into a temporary cache, never the user's (subprocesses inherit it)."""
    from headmaster.workspace import CACHE_ENV

    path = tmp_path_factory.mktemp("hm-cache")
    os.environ[CACHE_ENV] = str(path)
    return path


@pytest.fixture(scope="session")
def builtin_model(builtin_cache) -> Path:
    """The built-in backbone, converted and checked once per session."""
    from headmaster.embedding.builtin import ensure_builtin_model

    return ensure_builtin_model()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def clip_path(models_dir) -> Path:
    return build_clip(models_dir / "tiny-clip")


@pytest.fixture(scope="session")
def siglip_path(models_dir) -> Path:
    return build_siglip(models_dir / "tiny-siglip")


@pytest.fixture(scope="session")
def dinov2_path(models_dir) -> Path:
    return build_dinov2(models_dir / "tiny-dinov2")


@pytest.fixture(scope="session")
def timm_path(models_dir) -> Path:
    return build_timm(models_dir / "tiny-timm")


@pytest.fixture
def workspace(tmp_path) -> Path:
    ws = tmp_path / "workspace"
    (ws / "heads").mkdir(parents=True)
    return ws


@pytest.fixture
def ctx(workspace):
    with Context.open(str(workspace), EmbedOptions(device="cpu", progress=False)) as c:
        yield c


@pytest.fixture
def colour_head(workspace) -> Path:
    """heads/colour/{blue,red}/ with 24 images each."""
    head = workspace / "heads" / "colour"
    fill_bucket(head / "red", "red", 24, 0)
    fill_bucket(head / "blue", "blue", 24, 100)
    return head


@pytest.fixture
def clip_ctx(ctx, clip_path):
    add_model(ctx.store, "tiny-clip", str(clip_path), 24)
    return ctx


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by Selenium (tests/browser.py), one per module; skipped where there is none,
    except in CI, where skip_reason raises."""
    from browser import skip_reason, start_chromium

    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    driver = start_chromium()
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def guard():
    """The review page's guard for 127.0.0.1:7878 (helpers.ORIGIN)."""
    from headmaster.web.security import Guard

    return Guard("127.0.0.1", 7878)


@pytest.fixture(scope="module")
def client(service, guard):
    """A test client of the review page over the module's own `service` fixture (a ReviewService)."""
    from helpers import ORIGIN
    from starlette.testclient import TestClient

    from headmaster.web.app import create_app

    with TestClient(create_app(service, guard), base_url=ORIGIN) as c:
        yield c
