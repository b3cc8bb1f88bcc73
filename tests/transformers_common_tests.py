"""transformers' own model and config contract tests (`ModelTesterMixin`, `ConfigTester`), fetched at test time.

`tests/test_modeling_common.py` and `tests/test_configuration_common.py` are in transformers' source
distribution on PyPI, not in its wheel. `load()` downloads the sdist of the installed version with pip
(once: cached under $HF_DETR_CACHE or ~/.cache/hf_detr) and imports those two files as a package.
They import three test modules that the sdist does not ship; this package provides them:
- `exporters/test_export.py`: `ExportTesterMixin` (the export backends' tests: ONNX, ExecuTorch, ... ),
  empty here: hf_detr's tracing and ONNX export are tested in test_kernels.py;
- `generation/test_utils.py`: `GenerationTesterMixin`, empty: DETR does not generate (the mixin only checks
  that a model which cannot generate does not inherit it);
- `utils/test_configuration_utils.py`: `config_common_kwargs`, non-default values of PreTrainedConfig's
  common fields (`ConfigTester.check_config_arguments_init`, which returns early for configs with
  sub-configs, as HfDetrConfig has).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers
from filelock import FileLock

FILES = ("test_modeling_common.py", "test_configuration_common.py")
PACKAGE = "transformers_tests"

STUBS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        "    'return_dict': False, 'output_hidden_states': True, 'output_attentions': True, 'dtype': 'float16',\n"
        "    'id2label': {0: 'label'}, 'label2id': {'label': '0'}, 'problem_type': 'regression',\n"
        "    'architectures': ['HfDetrModel'], 'chunk_size_feed_forward': 5, 'tie_word_embeddings': False,\n"
        "}\n"
    ),
}


class Unavailable(RuntimeError):
    """The source distribution could not be downloaded (no route to PyPI)."""


def cache_root() -> Path:
    base = Path(os.environ.get("HF_DETR_CACHE", Path.home() / ".cache" / "hf_detr"))
    return base / "transformers-tests" / transformers.__version__


def fetch(root: Path) -> None:
    """Download transformers' sdist of the installed version with pip and keep the two test files."""
    with tempfile.TemporaryDirectory() as download:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
            f"transformers=={transformers.__version__}", "--dest", download,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(download).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise Unavailable(f"`{' '.join(command[2:])}` failed: {result.stderr.strip()[-800:]}")
        package = root / PACKAGE
        package.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as archive:
            for name in FILES:
                member = archive.getmember(f"transformers-{transformers.__version__}/tests/{name}")
                (package / name).write_bytes(archive.extractfile(member).read())
    for path, text in {"__init__.py": "", **STUBS}.items():
        (package / path).parent.mkdir(parents=True, exist_ok=True)
        for folder in (package / path).relative_to(package).parents:
            (package / folder / "__init__.py").touch()
        (package / path).write_text(text)
    (root / "complete").write_text(transformers.__version__)


def load():
    """-> (test_modeling_common, test_configuration_common) of the installed transformers version."""
    root = cache_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):  # pytest-xdist's workers collect this module at the same time
        if not (root / "complete").is_file():
            fetch(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return tuple(importlib.import_module(f"{PACKAGE}.{name[:-3]}") for name in FILES)
