"""Published weights by name ("DEFAULT", "COCO_V1", "IMAGENET1K_V1"): resolved to a URL, downloaded once into
torch.hub's cache with the hash in the file name checked, and a clear error without a network. A local HTTP
server stands in for download.pytorch.org, serving files made in the test."""

import hashlib
import http.server
import shutil
import socket
import threading

import pytest
import torch

from fasterrcnn.cli import main
from fasterrcnn.model import WeightsError, fasterrcnn_resnet18_c4, published, resnet_fpn_backbone
from fasterrcnn.model.resnet import ResNetBody

TINY = dict(representation_size=16)


class Server:
    """Serves ``root`` on 127.0.0.1 and counts the requests."""

    def __init__(self, root):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    root = tmp_path / "served"
    root.mkdir()
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    s = Server(root)
    monkeypatch.setattr(published, "_BASE", s.url)
    yield s, root, hub
    s.close()


def serve(obj, root, stem: str, *, wrong_hash: bool = False) -> str:
    """Save ``obj`` under ``root`` as ``<stem>-<first 8 hex of its SHA-256>.pth`` (as torchvision names files)."""
    tmp = root / "tmp.pth"
    torch.save(obj, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    name = f"{stem}-{'00000000' if wrong_hash else digest}.pth"
    shutil.move(tmp, root / name)
    return name


def test_a_named_detector_checkpoint_downloads_once_and_loads_strictly(server, monkeypatch):
    srv, root, hub = server
    torch.manual_seed(0)
    source = fasterrcnn_resnet18_c4(num_classes=3, **TINY)
    name = serve(source.state_dict(), root, "fasterrcnn_resnet18_c4_tiny")
    monkeypatch.setitem(published.DETECTORS, "fasterrcnn_resnet18_c4", {"COCO_V1": name, "DEFAULT": "COCO_V1"})
    model = fasterrcnn_resnet18_c4(weights="DEFAULT", **TINY)
    assert model.num_classes == 3  # from the checkpoint
    expected = source.state_dict()
    for k, v in model.state_dict().items():  # FrozenBatchNorm2d: no step counters
        assert torch.equal(v, expected[k]), k
    assert srv.requests == [f"/{name}"] and (hub / "checkpoints" / name).is_file()
    fasterrcnn_resnet18_c4(weights="COCO_V1", **TINY)  # the same file: from the cache
    fasterrcnn_resnet18_c4(weights="FasterRCNN_ResNet18_C4_Weights.COCO_V1", **TINY)  # the enum's string form
    assert len(srv.requests) == 1


def test_a_named_backbone_checkpoint_loads_into_the_trunk(server, monkeypatch):
    srv, root, _ = server
    torch.manual_seed(0)
    trunk = ResNetBody(18)
    name = serve({**trunk.state_dict(), "fc.weight": torch.zeros(1000, 512)}, root, "resnet18_test")
    monkeypatch.setitem(published.BACKBONES, "resnet18", {"IMAGENET1K_V1": name, "DEFAULT": "IMAGENET1K_V1"})
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights="DEFAULT")
    assert torch.equal(backbone.body.layer3[1].conv2.weight, trunk.layer3[1].conv2.weight)
    model = fasterrcnn_resnet18_c4(num_classes=3, weights_backbone="IMAGENET1K_V1", **TINY)
    assert torch.equal(model.backbone.body.conv1.weight, trunk.conv1.weight)
    assert srv.requests == [f"/{name}"]


def test_a_file_whose_content_does_not_match_its_name_is_refused_and_not_kept(server, monkeypatch):
    _, root, hub = server
    name = serve(fasterrcnn_resnet18_c4(num_classes=3, **TINY).state_dict(), root, "corrupt", wrong_hash=True)
    monkeypatch.setitem(published.DETECTORS, "fasterrcnn_resnet18_c4", {"COCO_V1": name, "DEFAULT": "COCO_V1"})
    with pytest.raises(WeightsError, match=r"cannot download http://127\.0\.0\.1:\d+/corrupt-00000000\.pth.*hash"):
        fasterrcnn_resnet18_c4(weights="DEFAULT", **TINY)
    assert not (hub / "checkpoints" / name).exists()


def test_without_a_network_the_error_says_what_to_do(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(published, "_BASE", f"http://127.0.0.1:{port}/")
    with pytest.raises(WeightsError, match="cannot download .*without a network, download the file elsewhere"):
        published_model = __import__("fasterrcnn").fasterrcnn_mobilenet_v3_large_320_fpn
        published_model(weights="DEFAULT")


def test_the_cli_reports_no_network_in_one_line_without_a_traceback(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(published, "_BASE", f"http://127.0.0.1:{port}/")
    (tmp_path / "img.jpg").write_bytes(b"")
    code = main(
        [
            "predict",
            str(tmp_path / "img.jpg"),
            "--weights",
            "DEFAULT",
            "--arch",
            "fasterrcnn_mobilenet_v3_large_320_fpn",
        ]
        + ["--out", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: cannot download http://127.0.0.1") and "Traceback" not in err
    assert "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth" in err


def test_an_unknown_name_lists_the_known_ones_and_a_file_of_that_name_is_a_path(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match=r"'COCO_V2' is not a published detector checkpoint .*COCO_V1, DEFAULT"):
        published.detector_weights("fasterrcnn_resnet50_fpn", "COCO_V2")
    with pytest.raises(WeightsError, match=r"names here: none"):
        fasterrcnn_resnet18_c4(weights="DEFAULT")
    assert published.backbone_weights("resnet50", "DEFAULT").endswith("/resnet50-11ad3fa6.pth")
    assert published.backbone_weights("mobilenet_v3_large", "IMAGENET1K_V1").endswith("-8738ca79.pth")
    monkeypatch.chdir(tmp_path)
    torch.save(fasterrcnn_resnet18_c4(num_classes=2, **TINY).state_dict(), tmp_path / "DEFAULT")
    assert fasterrcnn_resnet18_c4(weights="DEFAULT", **TINY).num_classes == 2  # the local file wins
    assert published.detector_weights("fasterrcnn_resnet50_fpn", "weights/model.pth") == "weights/model.pth"
