"""A checkpoint cannot run code: a crafted pickle whose unpickling would create a marker file is
refused, with a message naming the file, through every way a file reaches torch.load -- and the
package calls torch.load nowhere without weights_only=True."""

import ast
import pickle
from pathlib import Path

import pytest
import torch
import yaml

import fasterrcnn
from fasterrcnn.cli import main
from fasterrcnn.model import fasterrcnn_resnet18_fpn
from fasterrcnn.model.weights import WeightsError

from .helpers import TINY_MODEL, tiny_config

# torch warns that a bare pickle uses a protocol its weights-only reader may not know: that is the point
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


class _Payload:
    """Unpickling this calls open(marker, "w"): the marker file existing is proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil(tmp_path, fmt) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil_{fmt}.pt"
    payload = {"model": {"x": _Payload(marker)}, "config": {}, "class_names": ["__background__", "a"]}
    if fmt == "zip":  # what torch.save writes
        torch.save(payload, path)
    else:  # a bare pickle, as older tools wrote
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    return path, marker


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synth") / "data"


def _train_cli(tmp_path, synth_dir, *overrides) -> int:
    cfg = tiny_config(tmp_path, synth_dir, *overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return main(["train", "--config", str(path)])


ENTRY_POINTS = {
    "train --resume": lambda tmp, synth, evil: main(["train", "--resume", str(evil)]),
    "model.weights": lambda tmp, synth, evil: _train_cli(tmp, synth, f"model.weights={evil}"),
    "model.weights_backbone": lambda tmp, synth, evil: _train_cli(tmp, synth, f"model.weights_backbone={evil}"),
    "evaluate --weights": lambda tmp, synth, evil: main(["evaluate", "--weights", str(evil), "--data", "val.json"]),
}


@pytest.mark.parametrize("fmt", ["zip", "pickle"])
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_a_crafted_checkpoint_runs_no_code_through_any_entry_point(tmp_path, synth_dir, capsys, entry, fmt):
    evil, marker = _evil(tmp_path, fmt)
    rc = ENTRY_POINTS[entry](tmp_path, synth_dir, evil)
    err = capsys.readouterr().err
    assert not marker.exists(), "unpickling ran code"
    assert rc == 2
    assert f"refusing to load {evil}" in err and "can run any code" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "t" / "last.pt").exists()


@pytest.mark.parametrize("fmt", ["zip", "pickle"])
def test_python_builders_refuse_it_from_a_path_or_a_file_url(tmp_path, fmt):
    evil, marker = _evil(tmp_path, fmt)
    for source in (str(evil), evil.as_uri()):
        with pytest.raises(WeightsError, match=f"refusing to load .*{evil.name}"):
            fasterrcnn_resnet18_fpn(weights=source, **TINY_MODEL)
        with pytest.raises(WeightsError, match=f"refusing to load .*{evil.name}"):
            fasterrcnn_resnet18_fpn(weights_backbone=source, num_classes=3, **TINY_MODEL)
    assert not marker.exists()


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield owner, name, node


def test_every_load_in_the_package_is_weights_only():
    package = Path(fasterrcnn.__file__).parent
    loads, problems = 0, []
    for path in sorted(package.rglob("*.py")):
        for owner, name, node in _calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(package.parent)}:{node.lineno}"
            if (owner, name) in (
                ("torch", "load"),
                ("hub", "load_state_dict_from_url"),
            ) or name == "load_state_dict_from_url":
                loads += 1
                flag = [k.value for k in node.keywords if k.arg == "weights_only"]
                if not (flag and isinstance(flag[0], ast.Constant) and flag[0].value is True):
                    problems.append(f"{where}: {owner}.{name} without weights_only=True")
            if owner in ("pickle", "dill", "cloudpickle") and name in ("load", "loads", "Unpickler"):
                problems.append(f"{where}: {owner}.{name} unpickles arbitrary objects")
    assert loads >= 1 and not problems, problems
