"""The edit endpoint with the real parts: a local Ray, Ray Serve's HTTP proxy on 127.0.0.1, the
embedded model and the shipped bank; HTTP through httpx; the page in Debian's headless chromium.

The server starts once for this module (the only one that uses it) and is shut down at its end,
before the sweep tests, whose kill test runs `ray stop`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from noiseclr.serving.config import ServeConfig  # noqa: E402
from noiseclr.serving.proxy import proxy_env  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-7f3a9c"  # two keys are configured
BANK = ROOT / "platform/noiseclr/pretrained/banks/shapes"


def free_port() -> int:
    from noiseclr.tracking.server import free_port as port

    return port()


def register(folder: Path, model: str, alias: str | None) -> str:
    import mlflow

    from noiseclr.tracking.registry import log_bank

    with mlflow.start_run():
        return str(log_bank(folder, model, alias).version)


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlflow_server):
    import mlflow
    import ray
    from ray import serve

    from noiseclr.serving.app import start

    tmp = tmp_path_factory.mktemp("serve")
    other = tmp / "banks" / "other"  # a second bank (same directions, another name) for composing,
    copy_with_dead(BANK, other, DEAD)  # measured with dead directions (the page folds them away)
    # A registered bank served by alias: version 1 is the champion now, version 2 is promoted later.
    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_experiment("serve-tests")
    second = tmp / "banks" / "second"
    shutil.copytree(BANK, second)
    meta = json.loads((second / "bank.json").read_text())
    (second / "bank.json").write_text(json.dumps({**meta, "name": "second"}))
    assert register(BANK, "serve-bank", "champion") == "1" and register(second, "serve-bank", None) == "2"
    cfg = ServeConfig.from_yaml(
        ROOT / "jobs/serve-shapes.yaml",
        port=free_port(),
        device="cpu",
        labels_dir=str(tmp / "labels"),
        default_steps=4,
        default_inversion_steps=4,
        thumbnail_steps=3,
        banks={"shapes": str(BANK), "other": str(other), "reg": "models:/serve-bank@champion"},
        tracking_uri=mlflow_server.uri,
        alias_poll_s=2,
        replicas={
            "num_replicas": "auto",
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 4,
            "num_cpus": 1,
        },
    )
    os.environ["NOISECLR_API_KEYS"] = f"{KEY}, second-key"
    os.environ.update(proxy_env(cfg.limits.max_body_bytes))  # Serve's proxy reads it when it starts
    metrics_port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, _metrics_export_port=metrics_port, log_to_driver=False)
    try:
        url = start(cfg)
        client = httpx.Client(base_url=url, timeout=120, headers={"X-API-Key": KEY})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if client.get("/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the edit server did not become healthy in 180 s")
        yield {"url": url, "client": client, "cfg": cfg, "tmp": tmp, "metrics_port": metrics_port}
        client.close()
    finally:
        os.environ.pop("NOISECLR_API_KEYS", None)
        for name in proxy_env(0):
            os.environ.pop(name, None)
        serve.shutdown()
        ray.shutdown()


def by_index(rows: list[dict]) -> dict[int, dict]:
    """Directions are listed best first; tests look them up by index."""
    return {d["index"]: d for d in rows}


def copy_with_dead(src: Path, dst: Path, dead: tuple[int, ...]) -> Path:
    """A copy of bank `src` whose measurement found `dead` dead (score 0, as blind.py records)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "bank.json").read_text())
    rows = meta["scores"]["directions"]
    for i in dead:
        rows[i].update(dead=True, score=0.0, interval=[0.0, 0.0], duplicate_of=None)
    meta["scores"]["order"] = sorted(range(len(rows)), key=lambda i: -rows[i]["score"])
    meta["scores"]["groups"] = [[i for i in g if i not in dead] for g in meta["scores"].get("groups", [])]
    meta["scores"]["live"] = sum(not r["dead"] for r in rows)
    (dst / "bank.json").write_text(json.dumps(meta))
    return dst


DEAD = (1, 4)


def test_hide_dead_leaves_dead_directions_out(shapes_model, tmp_path):
    from noiseclr.serving.engine import BankStore, NotFound

    bank = copy_with_dead(BANK, tmp_path / "bank", DEAD)
    store = BankStore({"shapes": str(bank)}, shapes_model, tmp_path, hide_dead=True)
    dead = list(DEAD)
    assert not {d["index"] for d in store.directions("shapes")} & set(dead)
    assert store.describe("shapes")["hidden"] == len(dead)
    with pytest.raises(NotFound, match="measured dead and is hidden"):
        store.index("shapes", str(dead[0]))
    shown = BankStore({"shapes": str(bank)}, shapes_model, tmp_path)
    assert len(shown.directions("shapes")) == 12 and shown.index("shapes", str(dead[0])) == dead[0]


def labels_file(server, name: str) -> Path:
    (path,) = Path(server["cfg"].labels_dir).glob(f"{name}.*.json")
    return path


def test_labels_belong_to_one_set_of_directions(shapes_model, tmp_path):
    """A promoted version under the same name (other vectors) does not inherit the old labels."""
    import torch

    from noiseclr.bank import DirectionBank
    from noiseclr.serving.engine import BankStore

    first = BankStore({"b": str(BANK)}, shapes_model, tmp_path / "labels")
    first.set_label("b", 3, "stripes")
    assert first.index("b", "stripes") == 3
    bank = DirectionBank.load(BANK)
    bank.directions = bank.directions + 0.01 * torch.randn_like(bank.directions)
    bank.save(tmp_path / "v2")
    second = BankStore({"b": str(tmp_path / "v2")}, shapes_model, tmp_path / "labels")
    assert second.human_labels("b") == {} and second.direction("b", 3)["human_label"] is None
    assert BankStore({"b": str(BANK)}, shapes_model, tmp_path / "labels").index("b", "stripes") == 3


def png_image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def edit(client, body: dict, **kw):
    return client.post("/v1/edits", json=body, **kw)


# --- what works ---------------------------------------------------------------------------------


def test_edits_a_seed_an_upload_and_composes_banks(server):
    c = server["client"]
    plain = edit(c, {"seed": 3, "edits": []})
    assert plain.status_code == 200, plain.text
    assert plain.headers["content-type"] == "image/png"
    meta = json.loads(plain.headers["x-edit-meta"])
    assert meta["source"] == "seed" and meta["steps"] == 4 and meta["batch"] >= 1
    one = edit(c, {"seed": 3, "edits": [{"bank": "shapes", "direction": 11, "scale": 3}]})
    assert one.status_code == 200
    assert np.abs(png_image(one.content).astype(int) - png_image(plain.content)).mean() > 1  # it edits
    both = edit(
        c,
        {
            "seed": 3,
            "format": "json",
            "edits": [
                {"bank": "shapes", "direction": "<shapes-11>", "scale": 3},
                {"bank": "other", "direction": 6, "scale": 2, "t_high": 600, "t_low": 0},
            ],
        },
    )
    assert both.status_code == 200, both.text
    out = both.json()
    assert out["meta"]["edits"] == ["shapes:<shapes-11>", "other:<shapes-6>"]
    assert png_image(base64.b64decode(out["image"])).shape == (64, 64, 3)
    buf = io.BytesIO()
    Image.fromarray(png_image(plain.content)).save(buf, format="PNG")
    up = edit(
        c,
        {
            "image": base64.b64encode(buf.getvalue()).decode(),
            "edits": [{"bank": "shapes", "direction": 7, "scale": 2}],
        },
    )
    assert up.status_code == 200, up.text
    assert json.loads(up.headers["x-edit-meta"])["source"] == "upload"


def test_concurrent_requests_are_batched_and_match_single_requests(server):
    c = server["client"]
    bodies = [{"seed": s, "edits": [{"bank": "shapes", "direction": s % 12, "scale": 2}]} for s in range(6)]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda b: edit(c, b), bodies))
    assert all(r.status_code == 200 for r in together)
    assert max(json.loads(r.headers["x-edit-meta"])["batch"] for r in together) > 1
    alone = edit(c, bodies[4])
    assert np.abs(png_image(alone.content).astype(int) - png_image(together[4].content)).max() <= 2


def test_an_edit_is_the_same_image_beside_thumbnails_uploads_labels_and_other_edits(server):
    """On a replica that has rendered no thumbnails of these banks yet: the same request alone and
    while thumbnails of two banks, uploads (inverted with no directions), label writes and other
    edits run beside it in the replica's threads gives the same image; nothing answers 5xx."""
    c = server["client"]
    body = {"seed": 11, "edits": [{"bank": "shapes", "direction": 6, "scale": 2}]}
    upload = {"image": B64(encoded(Image.new("RGB", (64, 64), (200, 40, 40)), "PNG")), "edits": []}
    work = (
        [lambda: edit(c, body)] * 4
        + [
            lambda b=b, i=i: c.get(f"/v1/banks/{b}/directions/{i}/thumbnail.png")
            for b in ("other", "reg")
            for i in (0, 5, 11)
        ]
        + [lambda: edit(c, upload)] * 3
        + [
            lambda i=i: c.put(f"/v1/banks/other/directions/{i}/label", json={"label": f"l{i}"})
            for i in (1, 2)
        ]
        + [
            lambda s=s: edit(c, {"seed": s, "edits": [{"bank": "other", "direction": s, "scale": -2}]})
            for s in (1, 2, 3)
        ]
    )
    with ThreadPoolExecutor(len(work)) as pool:
        replies = list(pool.map(lambda f: f(), work))
    assert all(r.status_code == 200 for r in replies), [
        (r.status_code, r.text[:200]) for r in replies if r.status_code != 200
    ]
    alone = png_image(edit(c, body).content).astype(int)
    for r in replies[:4]:
        assert np.abs(png_image(r.content).astype(int) - alone).max() <= 2
    assert json.loads(labels_file(server, "other").read_text()) == {
        "<shapes-1>": "l1",
        "<shapes-2>": "l2",
    }


def test_health_tells_anyone_it_is_up_and_only_key_holders_the_details(server):
    c = server["client"]
    anonymous = c.get("/v1/health", headers={"x-api-key": ""})
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
    details = c.get("/v1/health").json()
    assert (
        details["auth"]
        and isinstance(details["pid"], int)
        and details["sources"]["reg"].startswith("models:/")
    )
    assert not any(v.startswith("/") for v in details["sources"].values())  # folder names, no paths


def test_lists_banks_directions_thumbnails_and_sets_labels(server):
    c = server["client"]
    banks = c.get("/v1/banks").json()
    assert [b["name"] for b in banks] == ["other", "reg", "shapes"] and banks[2]["directions"] == 12
    assert banks[2]["live"] == sum(
        not d["dead"] for d in json.loads((BANK / "bank.json").read_text())["scores"]["directions"]
    )
    listed = c.get("/v1/banks/shapes/directions").json()
    # best first by the oracle-free score, dead directions last
    live = [d for d in listed if not d["dead"]]
    assert listed[: len(live)] == live and all(0 <= d["score"] <= 1 for d in listed)
    heads = [d["score"] for d in live if d["duplicate_of"] is None]
    assert heads == sorted(heads, reverse=True) and all(d["score"] == 0 for d in listed[len(live) :])
    dirs = {d["index"]: d for d in listed}
    assert all(d["window"] == [600, 0] for d in listed)  # each direction's edit window (the bank's)
    auto = json.loads((BANK / "bank.json").read_text())["labels"]["<shapes-11>"]
    assert dirs[11]["auto_label"] == auto["auto"] and dirs[11]["human_label"] is None
    thumb = c.get(dirs[11]["thumbnail"])
    assert thumb.status_code == 200 and png_image(thumb.content).shape == (64, 192, 3)
    set_ = c.put("/v1/banks/shapes/directions/11/label", json={"label": "darker"})
    assert set_.status_code == 200 and set_.json()["label"] == "darker"
    assert by_index(c.get("/v1/banks/shapes/directions").json())[11]["label"] == "darker"
    stored = json.loads(labels_file(server, "shapes").read_text())
    assert stored == {"<shapes-11>": "darker"}
    assert json.loads((BANK / "bank.json").read_text())["labels"]["<shapes-11>"] == auto  # untouched
    by_label = edit(c, {"seed": 1, "edits": [{"bank": "shapes", "direction": "darker", "scale": 1}]})
    assert by_label.status_code == 200, by_label.text
    assert c.put("/v1/banks/shapes/directions/11/label", json={"label": ""}).json()["human_label"] is None
    spec = c.get("/openapi.json").json()
    assert {"/v1/edits", "/v1/banks", "/v1/health"} <= set(spec["paths"])
    assert "EditItem" in json.dumps(spec["paths"]["/v1/edits"])


# --- bad input: a 4xx JSON error naming the problem, and the server keeps serving ------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no real pixel data): a decompression bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (  # noqa: E731
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


B64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


GOOD = {"bank": "shapes", "direction": 0, "scale": 1}
BAD = [
    ("corrupt base64", {"image": "not*base64!"}, {}, 422, "base64"),
    ("not an image", {"image": B64(b"hello, not a picture")}, {}, 422, "not a png, jpeg or webp image"),
    (
        "a GIF upload",
        {"image": B64(encoded(Image.new("RGB", (64, 64)), "GIF"))},
        {},
        422,
        "png, jpeg or webp",
    ),
    (
        "a TIFF upload",
        {"image": B64(encoded(Image.new("RGB", (64, 64)), "TIFF"))},
        {},
        422,
        "png, jpeg or webp",
    ),
    ("one direction twice", {"edits": [GOOD, {**GOOD, "direction": "<shapes-0>"}]}, {}, 422, "given twice"),
    ("20000 x 20000 header", {"image": B64(png_header(20000, 20000))}, {}, 413, "refused"),
    ("3000 x 3000 header", {"image": B64(png_header(3000, 3000))}, {}, 413, "3000 x 3000 pixels"),
    ("negative steps", {"steps": -3}, {}, 422, "steps"),
    ("too many steps", {"steps": 5000}, {}, 422, "at most 100"),
    ("NaN scale", '{"edits": [{"bank": "shapes", "direction": 0, "scale": NaN}]}', {}, 422, "scale"),
    ("infinite scale", '{"edits": [{"bank": "shapes", "direction": 0, "scale": 1e999}]}', {}, 422, "scale"),
    ("scale beyond the cap", {"edits": [{**GOOD, "scale": 50}]}, {}, 422, "at most 8"),
    ("1000 directions", {"edits": [GOOD] * 1000}, {}, 422, "at most 16"),
    ("unknown bank", {"edits": [{**GOOD, "bank": "nope"}]}, {}, 404, "no bank named 'nope'"),
    ("unknown direction", {"edits": [{**GOOD, "direction": 99}]}, {}, 404, "no direction 99"),
    ("unknown label", {"edits": [{**GOOD, "direction": "wings"}]}, {}, 404, "no direction 'wings'"),
    ("a path as bank name", {"edits": [{**GOOD, "bank": "../../etc"}]}, {}, 422, "bank"),
    ("unknown field", {"seed": 1, "colour": "red"}, {}, 422, "colour"),
    ("not JSON", "{seed: 1", {}, 422, "json"),
    ("window upside down", {"edits": [{**GOOD, "t_high": 100, "t_low": 500}]}, {}, 422, "t_low"),
    ("word the world lacks", {"prompt": "a dragon at top left"}, {}, 422, "prompt"),
    ("image and prompt", {"image": B64(b"x"), "prompt": "a shape at middle center"}, {}, 422, "not both"),
    ("wrong content type", "seed=1", {"content-type": "text/plain"}, 415, "application/json"),
    ("no API key", {"seed": 1}, {"x-api-key": ""}, 401, "API key"),
    ("wrong API key", {"seed": 1}, {"x-api-key": KEY + "x"}, 401, "API key"),
    ("oversized body", {"image": "A" * 9_000_000}, {}, 413, "bytes"),
]


@pytest.mark.parametrize("what,body,headers,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_edit_requests_get_a_clear_4xx(server, what, body, headers, status, message):
    c = server["client"]
    if isinstance(body, str):
        r = c.post("/v1/edits", content=body, headers={"content-type": "application/json", **headers})
    else:
        r = c.post("/v1/edits", json=body, headers=headers)
    assert r.status_code == status, (what, r.status_code, r.text[:300])
    assert message.lower() in r.json()["error"].lower(), r.json()
    assert c.get("/v1/health").status_code == 200


def probe_module():
    """jobs/bench/probe_endpoint.py: the probes docs/serving.md's table is made of."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_endpoint", ROOT / "jobs/bench/probe_endpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uploads_in_every_format_a_camera_or_editor_writes_are_edited(server):
    """Camera and editor variants of PNG/JPEG/WebP edit; other formats are a clear 422."""
    c = server["client"]
    refused = {"GIF", "TIFF", "BMP", "SVG text"}
    for what, data in probe_module().uploads().items():
        r = edit(c, {"image": data, "edits": [GOOD]})
        if what in refused:
            assert r.status_code == 422 and "png, jpeg or webp" in r.json()["error"].lower(), what
        else:
            assert r.status_code == 200, (what, r.status_code, r.text[:300])
            assert png_image(r.content).shape == (64, 64, 3), what


def test_no_input_gets_a_5xx_or_a_dropped_connection(server):
    """jobs/bench/probe_endpoint.py's probes (every field with every JSON type it does not document,
    every route with the methods it lacks, oversized headers and URLs, odd bodies, uploads in
    every format): each answer is a 2xx or a 4xx with a JSON error, and afterwards the server
    edits and its labels are intact. The same probes make docs/serving.md's table."""
    probe = probe_module()
    c = server["client"]
    labels = {p.name: p.read_bytes() for p in Path(server["cfg"].labels_dir).glob("*.json")}
    rows = probe.probe(c, "shapes")
    bad = [r for r in rows if not (200 <= r["code"] < 300 or (400 <= r["code"] < 500 and r["error"]))]
    assert not bad, bad
    assert {r["code"] for r in rows if r["what"].startswith(("GET /v1/edits", "DELETE /v1/banks"))} == {405}
    assert all(r["code"] == 422 for r in rows if r["what"] in ("seed = true", 'seed = "x"', "steps = 1.5"))
    assert [r["code"] for r in rows if r["what"] == "a 64 KiB header"] == [431]
    assert edit(c, {"seed": 1, "edits": [GOOD]}).status_code == 200
    assert labels == {p.name: p.read_bytes() for p in Path(server["cfg"].labels_dir).glob("*.json")}


def test_a_chunked_body_past_the_limit_is_refused_as_it_passes_and_its_connection_closed(server):
    """A body without Content-Length that grows past limits.max_body_bytes: the 413 arrives while the
    client is still sending, and the server closes the connection instead of reading on (before
    the proxy's middleware it read all of it and answered after tens of MB)."""
    import socket

    cfg = server["cfg"]
    limit, chunk = cfg.limits.max_body_bytes, 2**16
    headers = f"X-API-Key: {KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    payload = b"%x\r\n" % chunk + b" " * chunk + b"\r\n"
    sent, reply = 0, []
    with socket.create_connection((cfg.host, cfg.port), timeout=30) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2**16)  # what the kernel holds back, small
        conn.sendall(f"POST /v1/edits HTTP/1.1\r\nHost: {cfg.host}\r\n{headers}\r\n".encode())
        reader = threading.Thread(target=lambda: reply.append((conn.recv(4096), sent)), daemon=True)
        reader.start()
        with pytest.raises(OSError):  # reset or broken pipe: the server stopped reading
            while sent < 8 * limit:
                conn.sendall(payload)
                sent += chunk
        reader.join(30)
    head, answered_at = reply[0]  # the bytes sent when the answer came
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower(), head
    # what the kernel's socket buffers hold beyond the limit, not the rest of the body
    assert answered_at < 2 * limit and sent < 2 * limit, (answered_at, sent)
    assert edit(server["client"], {"seed": 1, "edits": [GOOD]}).status_code == 200


def test_bad_label_and_lookup_requests(server):
    c = server["client"]
    assert (
        c.put(
            "/v1/banks/shapes/directions/1/label", json={"label": "x"}, headers={"x-api-key": ""}
        ).status_code
        == 401
    )
    assert c.put("/v1/banks/shapes/directions/1/label", json={"label": "x" * 500}).status_code == 422
    assert c.put("/v1/banks/shapes/directions/1/label", json={"label": "a\x00b"}).status_code == 422
    assert c.put("/v1/banks/shapes/directions/77/label", json={"label": "x"}).status_code == 404
    assert c.get("/v1/banks/..%2F..%2Fetc/directions").status_code == 404
    assert c.get("/v1/banks/nope/directions").status_code == 404
    assert c.get("/v1/banks").status_code == 200
    assert c.get("/v1/banks", headers={"x-api-key": "second-key"}).status_code == 200
    assert c.get("/v1/banks", headers={"x-api-key": ""}).status_code == 401
    assert not list(Path(server["cfg"].labels_dir).glob("nope*"))
    # A label never shadows what an index or a token names, nor another direction's label.
    assert c.put("/v1/banks/shapes/directions/1/label", json={"label": "3"}).status_code == 422
    assert c.put("/v1/banks/shapes/directions/1/label", json={"label": "<shapes-2>"}).status_code == 422
    assert c.put("/v1/banks/shapes/directions/1/label", json={"label": "taken"}).status_code == 200
    clash = c.put("/v1/banks/shapes/directions/2/label", json={"label": "taken"})
    assert clash.status_code == 422 and "already names <shapes-1>" in clash.json()["error"]
    assert c.put("/v1/banks/shapes/directions/1/label", json={"label": ""}).status_code == 200


def test_past_the_queue_bound_requests_get_503_with_retry_after(server):
    """A second app on the same cluster with room for one running and one waiting request: a burst
    of ten gets some 200s and, for the rest, an immediate 503 carrying Retry-After (no queue)."""
    from ray import serve

    from noiseclr.serving.app import build

    cfg = server["cfg"]
    tight = cfg.model_copy(
        update={
            "banks": {"shapes": str(BANK)},
            "replicas": cfg.replicas.model_copy(
                update={
                    "num_replicas": 1,
                    "max_ongoing_requests": 1,
                    "max_queued_requests": 1,
                    "retry_after_s": 3,
                }
            ),
        }
    )
    serve.run(build(tight), name="tight", route_prefix="/tight")
    try:
        url = f"http://{cfg.host}:{cfg.port}/tight"
        body = {"seed": 1, "steps": 40, "edits": [GOOD]}
        with httpx.Client(base_url=url, timeout=120, headers={"X-API-Key": KEY}) as c:
            assert edit(c, body).status_code == 200  # the replica is up
            with ThreadPoolExecutor(10) as pool:
                replies = list(pool.map(lambda _: edit(c, body), range(10)))
        codes = sorted(r.status_code for r in replies)
        assert set(codes) == {200, 503} and codes.count(200) >= 1, codes
        assert all(r.headers.get("retry-after") == "3" for r in replies if r.status_code == 503)
        # An external load generator: one client (the rate a replica sustains) gets only 200s;
        # twelve get 200s and 503s, never a 5xx of another kind or a dropped connection.
        if shutil.which("hey") is None:
            pytest.skip("no hey binary (make test installs Debian's): the external load check not run")
        hey = probe_module().hey  # the load generator docs/serving.md's table comes from
        one = hey(f"{url}/v1/edits", body, 1, seconds=4, key=KEY)
        many = hey(f"{url}/v1/edits", body, 12, seconds=4, key=KEY)
        assert set(one["codes"]) == {200} and not one["errors"], one
        assert set(many["codes"]) == {200, 503} and not many["errors"], many
    finally:
        serve.delete("tight")


def test_past_the_latency_bound_requests_get_503_at_once_and_admitted_ones_finish_within_it(server):
    """Fault table, the endpoint overloaded: a replica with a 3 s latency bound and room for all
    requests in its queue. After one edit (the replica measures its speed), a burst of 16 edits
    of 40 steps: those admitted are answered within the bound (a batch of slack for the
    estimate), the rest get 503 with Retry-After at once, not after waiting in a queue."""
    from ray import serve

    from noiseclr.serving.app import build

    cfg, bound = server["cfg"], 3.0
    bounded = cfg.model_copy(
        update={
            "banks": {"shapes": str(BANK)},
            "replicas": cfg.replicas.model_copy(
                update={"num_replicas": 1, "max_ongoing_requests": 64, "latency_bound_s": bound}
            ),
        }
    )
    serve.run(build(bounded), name="bounded", route_prefix="/bounded")
    try:
        url = f"http://{cfg.host}:{cfg.port}/bounded"
        body = {"seed": 1, "steps": 40, "edits": [GOOD]}
        with httpx.Client(base_url=url, timeout=120, headers={"X-API-Key": KEY}) as c:
            first = edit(c, body)
            assert first.status_code == 200  # the replica is up and has timed a batch
            one = json.loads(first.headers["x-edit-meta"])["ms"] / 1000

            def timed(_):
                began = time.perf_counter()
                reply = edit(c, body)
                return reply, time.perf_counter() - began

            with ThreadPoolExecutor(16) as pool:
                replies = list(pool.map(timed, range(16)))
        ok = [t for r, t in replies if r.status_code == 200]
        shed = [(r, t) for r, t in replies if r.status_code == 503]
        assert ok and shed and len(ok) + len(shed) == 16, [r.status_code for r, _ in replies]
        assert max(ok) < bound + 2 * one, (ok, one)  # within the bound, give or take the estimate
        for reply, took in shed:
            assert int(reply.headers["retry-after"]) >= 1 and "busy" in reply.json()["error"]
            assert took < one, (took, one)  # refused at once: less than one edit's time
    finally:
        serve.delete("bounded")


def test_no_keys_on_a_reachable_address_is_refused_unless_anonymous_is_meant(monkeypatch):
    from noiseclr.errors import ConfigError
    from noiseclr.serving.app import check_exposure, key_hashes

    cfg = ServeConfig.from_yaml(ROOT / "jobs/serve-sd15.yaml")  # binds 0.0.0.0
    monkeypatch.delenv(cfg.api_keys_env, raising=False)
    with pytest.raises(ConfigError, match=r"0\.0\.0\.0 is reachable from other machines and no API key"):
        check_exposure(cfg, key_hashes(cfg))
    check_exposure(cfg.model_copy(update={"allow_anonymous": True}), [])
    check_exposure(cfg.model_copy(update={"host": "127.0.0.1"}), [])
    monkeypatch.setenv(cfg.api_keys_env, "k1")
    check_exposure(cfg, key_hashes(cfg))


def test_a_direction_edits_in_its_own_measured_window(shapes_model, tmp_path, monkeypatch):
    """A bank whose measurement chose a window per direction: requests, thumbnails and the
    direction list use direction k's window; a request's own t_high still wins."""
    from noiseclr.editing import sampler
    from noiseclr.serving.engine import EditEngine
    from noiseclr.serving.schema import EditRequest

    shutil.copytree(BANK, tmp_path / "bank")
    meta = json.loads((tmp_path / "bank" / "bank.json").read_text())
    meta["edit_defaults"]["windows"] = [[600, 0]] * 12
    meta["edit_defaults"]["windows"][3] = [850, 0]
    (tmp_path / "bank" / "bank.json").write_text(json.dumps(meta))
    cfg = ServeConfig(banks={"shapes": str(tmp_path / "bank")}, device="cpu", labels_dir=str(tmp_path))
    eng = EditEngine(cfg, shapes_model)
    own, other, forced = (
        eng.prepare(
            EditRequest(seed=1, steps=4, edits=[{"bank": "shapes", "direction": d, "scale": 1, **kw}])
        )
        for d, kw in ((3, {}), (2, {}), (3, {"t_high": 500}))
    )
    assert [(j.edits[0].t_high, j.edits[0].t_low) for j in (own, other, forced)] == [
        (850, 0),
        (600, 0),
        (500, 0),
    ]
    assert eng.store.direction("shapes", 3)["window"] == [850, 0]
    seen, sample = [], sampler.sample
    monkeypatch.setattr(
        sampler, "sample", lambda m, x, edits, *a, **k: seen.append(edits) or sample(m, x, edits, *a, **k)
    )
    eng._thumbnail_chunk(eng.store.get("shapes"), range(2, 4))
    assert [(e.t_high, e.t_low) for e in seen[0]] == [(600, 0), (850, 0)]


def test_thumbnails_render_once_per_bank_in_chunks_within_the_row_budget(shapes_model, tmp_path):
    """Four threads ask for one bank's thumbnails at once: one render (others wait for it), in
    chunks whose UNet calls stay within thumbnail_max_rows, the same strips as one big call."""
    from noiseclr.serving.engine import EditEngine

    def engine(rows: int) -> EditEngine:
        cfg = ServeConfig(
            banks={"shapes": str(BANK)},
            device="cpu",
            thumbnail_steps=2,
            thumbnail_max_rows=rows,
            labels_dir=str(tmp_path),
        )
        return EditEngine(cfg, shapes_model)

    chunked, whole = engine(12), engine(200)
    chunks, rows = [], []
    chunked.on_thumbnail_chunk = chunks.append
    unet = shapes_model.pipe.unet
    hook = unet.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    try:
        with ThreadPoolExecutor(4) as pool:
            strips = list(pool.map(lambda _: chunked.thumbnails("shapes"), range(4)))
    finally:
        hook.remove()
    # 12 directions, 1 per call (12 rows / (3 x 3 scales): empty, the bank's domain prompt and the
    # edit for each scale): rendered once
    assert chunks == ["shapes"] * 12
    assert rows and max(rows) <= 12
    assert all(s is strips[0] for s in strips)
    for a, b in zip(strips[0], whole.thumbnails("shapes"), strict=True):
        assert np.abs(png_image(a).astype(int) - png_image(b).astype(int)).max() <= 2


def test_a_failing_request_gets_its_own_error_and_its_neighbours_their_images(
    shapes_model, tmp_path, monkeypatch
):
    import torch

    from noiseclr.editing import sampler
    from noiseclr.errors import EditError
    from noiseclr.serving.engine import EditEngine
    from noiseclr.serving.schema import EditRequest

    cfg = ServeConfig(banks={"shapes": str(BANK)}, device="cpu", labels_dir=str(tmp_path))
    eng = EditEngine(cfg, shapes_model)
    good = eng.prepare(EditRequest(seed=2, steps=4, edits=[GOOD]))
    bad = eng.prepare(EditRequest(seed=3, steps=4, edits=[GOOD]))
    bad.x_T = torch.full_like(bad.x_T, float("nan"))  # what a broken start latent gives
    calls, sample = [], sampler.sample
    monkeypatch.setattr(sampler, "sample", lambda *a, **k: calls.append(1) or sample(*a, **k))
    together = eng.run([good, bad])
    assert isinstance(together[1], EditError) and "non-finite" in str(together[1])
    assert len(calls) == 1  # one batched call for both; nobody re-run
    alone = eng.run([eng.prepare(EditRequest(seed=2, steps=4, edits=[GOOD]))])[0]
    assert np.abs(png_image(together[0]).astype(int) - png_image(alone).astype(int)).max() <= 2


# --- operations ------------------------------------------------------------------------------------


def running_replicas(name: str) -> int:
    from ray import serve

    app = serve.status().applications[name]
    return app.deployments["EditServer"].replica_states.get("RUNNING", 0)


def one_replica(name: str, timeout: float = 120) -> None:
    """Wait (bounded) until earlier tests' load has been scaled back down to one replica."""
    deadline = time.monotonic() + timeout
    while running_replicas(name) != 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert running_replicas(name) == 1


def test_a_moved_bank_alias_reloads_the_running_replica(server, mlflow_server):
    from mlflow import MlflowClient

    c = server["client"]
    one_replica(server["cfg"].name)  # the pid below must be the one replica's
    before = c.get("/v1/health").json()
    assert before["versions"]["reg"] == "1"
    body = {"seed": 2, "steps": 2, "edits": [{"bank": "reg", "direction": 11, "scale": 2}]}
    first = edit(c, body)
    assert first.status_code == 200 and json.loads(first.headers["X-Edit-Meta"])["versions"] == {"reg": "1"}
    answers, moved = [], threading.Event()

    def keep_editing() -> None:  # requests in flight while the alias moves and the bank reloads
        while not moved.is_set():
            r = edit(c, body)
            answers.append((r.status_code, json.loads(r.headers.get("X-Edit-Meta", "{}")).get("versions")))

    client_thread = threading.Thread(target=keep_editing)
    client_thread.start()
    MlflowClient(mlflow_server.uri).set_registered_model_alias("serve-bank", "champion", "2")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and c.get("/v1/health").json()["versions"]["reg"] != "2":
        time.sleep(1)
    time.sleep(1)
    moved.set()
    client_thread.join(60)
    assert answers and all(code == 200 for code, _ in answers), answers  # none dropped or failed
    seen = [v["reg"] for _, v in answers]
    assert seen == sorted(seen) and seen[-1] == "2", seen  # each answer names its version: 1s, then 2s
    after = c.get("/v1/health").json()
    assert after["versions"]["reg"] == "2"
    assert after["pid"] == before["pid"] and after["up_s"] >= before["up_s"]  # not restarted
    assert [b["version"] for b in c.get("/v1/banks").json()] == [None, "2", None]
    assert edit(c, {"seed": 2, "edits": [{"bank": "reg", "direction": 11, "scale": 2}]}).status_code == 200


def test_replicas_scale_up_under_load_and_back_down(server):
    c, name = server["client"], server["cfg"].name
    one_replica(name)
    body = {"seed": 0, "steps": 8, "edits": [GOOD]}
    peak, deadline = 1, time.monotonic() + 120
    with ThreadPoolExecutor(6) as pool:
        while time.monotonic() < deadline and peak < 2:
            list(pool.map(lambda _: edit(c, body), range(12)))
            peak = max(peak, running_replicas(name))
    assert peak == 2
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and running_replicas(name) > 1:
        time.sleep(2)
    assert running_replicas(name) == 1


def test_a_killed_replica_is_replaced_and_retried_requests_succeed(server):
    import signal

    c = server["client"]
    pid = c.get("/v1/health").json()["pid"]
    labels = Path(server["cfg"].labels_dir)
    c.put("/v1/banks/shapes/directions/2/label", json={"label": "kept"})
    before = {p.name: p.read_bytes() for p in labels.glob("*.json")}

    def with_retries(seed: int) -> int:
        for _ in range(60):
            try:
                r = edit(c, {"seed": seed, "edits": [GOOD]})
                if r.status_code == 200:
                    return r.status_code
            except httpx.TransportError:
                pass
            time.sleep(1)
        return 0

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(with_retries, s) for s in range(8)]
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        assert [f.result() for f in futures] == [200] * 8
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            health = c.get("/v1/health").json()
            if health["pid"] != pid:
                break
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(1)
    assert health["pid"] != pid
    assert {p.name: p.read_bytes() for p in labels.glob("*.json")} == before
    assert by_index(c.get("/v1/banks/shapes/directions").json())[2]["label"] == "kept"


def test_serving_metrics_reach_rays_metrics_endpoint(server):
    c = server["client"]  # one edit and one refused request, so every metric has a sample
    assert edit(c, {"seed": 5, "edits": [GOOD]}).status_code == 200
    assert edit(c, {"edits": [{**GOOD, "bank": "nope"}]}).status_code == 404
    names = (
        "noiseclr_edit_requests",
        "noiseclr_edit_latency_s",
        "noiseclr_edit_batch_size",
        "noiseclr_edit_errors",
    )
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{server['metrics_port']}/metrics", timeout=10).text
        if all(n in text for n in names):
            break
        time.sleep(2)
    missing = [n for n in names if n not in text]
    assert not missing, missing


# --- the page, in a real browser ---------------------------------------------------------------------


def test_the_page_edits_with_a_slider_in_headless_chromium(server):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not (chromium and driver_bin):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_bin), options=options)
    try:
        browser.get(server["url"] + "/")
        browser.execute_script(f"localStorage.setItem('noiseclr-key', {json.dumps(KEY)})")
        browser.get(server["url"] + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "input.slider")) == 36)
        wait.until(
            lambda b: (b.find_element(By.ID, "edited").get_attribute("src") or "").startswith(
                "data:image/png"
            )
        )
        first = browser.find_element(By.ID, "edited").get_attribute("src")
        slider = browser.find_element(
            By.CSS_SELECTOR, "input.slider[data-bank='shapes'][data-direction='11']"
        )
        slider.click()  # focus, then move it with the keyboard as a user would
        for _ in range(4):
            slider.send_keys("\ue014")  # arrow right: +0.5 each
        wait.until(lambda b: b.find_element(By.ID, "edited").get_attribute("src") != first)
        wait.until(
            lambda b: (
                "shapes:<shapes-11>" in (b.find_element(By.ID, "edited").get_attribute("data-edits") or "")
            )
        )
        names = [n.text for n in browser.find_elements(By.CSS_SELECTOR, ".dir .name")]
        assert json.loads((BANK / "bank.json").read_text())["labels"]["<shapes-11>"]["auto"] in names
        loaded = "return [...document.querySelectorAll('.dir img')].filter(i => i.naturalWidth > 0).length"
        wait.until(lambda b: b.execute_script(loaded) == 36)  # every thumbnail arrived and decoded
        # rename a direction through the page's dialog; the server keeps it
        name = browser.find_element(By.CSS_SELECTOR, ".dir .name[data-bank='other'][data-index='7']")
        name.click()
        alert = wait.until(lambda b: b.switch_to.alert)
        alert.send_keys("stripes")
        alert.accept()
        wait.until(lambda b: name.text == "stripes")
        assert (
            by_index(server["client"].get("/v1/banks/other/directions").json())[7]["human_label"] == "stripes"
        )

        # dead directions are folded away under the grid of each bank
        def dead(folder: Path) -> int:
            return sum(
                d["dead"] for d in json.loads((folder / "bank.json").read_text())["scores"]["directions"]
            )

        folded = browser.find_elements(By.CSS_SELECTOR, "details.dead .dir")
        other = server["tmp"] / "banks" / "other"
        assert dead(other) >= len(DEAD) and len(folded) == 2 * dead(BANK) + dead(other)  # shapes, reg: BANK
        # upload a real image: it is inverted and edited with the slider still at +2
        upload = server["tmp"] / "upload.png"
        Image.fromarray(np.full((96, 80, 3), 200, np.uint8)).save(upload)
        browser.find_element(By.ID, "upload").send_keys(str(upload))
        wait.until(lambda b: '"source": "upload"' in b.find_element(By.ID, "meta").text)
        shot = ROOT / "out" / "serve" / "page.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        browser.quit()


# --- the command and Ray's own deployment path ----------------------------------------------------


def test_noiseclr_serve_answers_edits_and_stops_on_sigterm(tmp_path):
    import signal
    import subprocess
    import sys
    import threading

    port = free_port()
    env = {**os.environ, "NOISECLR_API_KEYS": ""}
    command = [
        sys.executable,
        "-m",
        "noiseclr.cli",
        "serve",
        "--config",
        str(ROOT / "jobs/serve-shapes.yaml"),
    ]
    proc = subprocess.Popen(
        [*command, "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240  # the command says where it serves once it is ready
        while time.monotonic() < deadline and proc.poll() is None:
            if any("edit endpoint at http://127.0.0.1:" in line for line in lines):
                break
            time.sleep(1)
        else:
            pytest.fail("noiseclr serve did not come up: " + "".join(lines)[-2000:])
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/edits",
            json={"seed": 3, "steps": 4, "edits": [{"bank": "shapes", "direction": 11, "scale": 2}]},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert png_image(r.content).shape == (64, 64, 3)
    finally:
        proc.send_signal(signal.SIGTERM)  # the command itself: it shuts Serve and Ray down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)[-2000:]


def test_the_serve_config_file_matches_rays_schema_and_builds(tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from noiseclr.errors import ConfigError
    from noiseclr.serving.app import build_app

    spec = ServeDeploySchema.model_validate(
        yaml.safe_load((ROOT / "jobs/serve-shapes.serve.yaml").read_text())
    )
    app = spec.applications[0]
    module, _, attr = app.import_path.partition(":")
    assert (module, attr) == ("noiseclr.serving.app", "build_app")
    config = ROOT / app.args["config"]
    assert config.exists()
    built = build_app({"config": str(config)})
    assert type(built).__name__ == "Application"
    (tmp_path / "bad.yaml").write_text("banks: {shapes: x}\nreplica: {num_cpus: 1}\n")
    with pytest.raises(ConfigError, match="replica"):
        ServeConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "secret.yaml").write_text("banks: {shapes: x}\ntracking_uri: http://me:hunter2@mlflow:5000\n")
    with pytest.raises(ConfigError, match="tracking_uri carries a password"):
        ServeConfig.from_yaml(tmp_path / "secret.yaml")
    (tmp_path / "walk.yaml").write_text("banks: {'../x': y}\n")
    with pytest.raises(ConfigError, match="bank name"):
        ServeConfig.from_yaml(tmp_path / "walk.yaml")


def test_serve_run_deploys_the_serve_config_file(tmp_path):
    """Ray's own CLI on jobs/serve-shapes.serve.yaml (a free port, a temporary labels folder)."""
    import signal
    import subprocess
    import sys

    import yaml

    spec = yaml.safe_load((ROOT / "jobs/serve-shapes.serve.yaml").read_text())
    port = free_port()
    spec["http_options"]["port"] = port
    spec["applications"][0]["args"] = {
        "config": str(ROOT / spec["applications"][0]["args"]["config"]),
        "labels_dir": str(tmp_path / "labels"),
        "device": "cpu",
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(spec))
    serve_cli = Path(sys.executable).with_name("serve")
    env = {**os.environ, "NOISECLR_API_KEYS": ""}
    proc = subprocess.Popen(
        [str(serve_cli), "run", str(tmp_path / "serve.yaml")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline, r = time.monotonic() + 240, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=10).status_code == 200:
                    r = httpx.post(
                        f"http://127.0.0.1:{port}/v1/edits",
                        json={
                            "seed": 1,
                            "steps": 4,
                            "edits": [{"bank": "shapes", "direction": 6, "scale": 1}],
                        },
                        timeout=60,
                    )
                    break
            except httpx.TransportError:
                pass
            time.sleep(2)
        assert r is not None and r.status_code == 200, (r and r.text, proc.poll())
    finally:
        proc.send_signal(signal.SIGINT)  # serve run shuts the app and its Ray down on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- a user's own SD model ----------------------------------------------------------------------


def second_app(server, model: Path, bank: Path, name: str) -> ServeConfig:
    """The server's config for a second app beside the shapes one: `model` with `bank` as
    "faces", one replica, on its own route /NAME."""
    replicas = server["cfg"].replicas.model_copy(update={"num_replicas": 1})
    update = {"model": str(model), "banks": {"faces": str(bank)}, "name": name, "route_prefix": f"/{name}"}
    return server["cfg"].model_copy(update={**update, "replicas": replicas})


def test_a_bank_of_an_sd15_model_is_served_and_a_bank_of_another_model_is_one_line(
    server, sd15_folder, sd15_model, tmp_path
):
    """The SD 1.5-structured stand-in as a second app beside the shapes one (same Serve, its own
    route): one edit at fp32; a config naming a bank of another model fails to start with the
    replica's reason as one user error (what `noiseclr serve` prints, exit 2), not Ray's."""
    import torch
    from ray import serve

    from noiseclr.bank import DirectionBank
    from noiseclr.errors import BankError
    from noiseclr.serving.app import start

    width = sd15_model.pipe.text_encoder.get_input_embeddings().weight.shape[1]
    base = {"source": str(sd15_folder), "fingerprint": sd15_model.fingerprint, "hidden_size": width}
    own = DirectionBank(torch.randn(3, width) * 0.3, base, name="faces").save(tmp_path / "faces")
    cfg = second_app(server, sd15_folder, own, "sd15")
    try:
        url = start(cfg)
        c = server["client"]
        body = {
            "seed": 1,
            "prompt": "a photo of a face",
            "edits": [{"bank": "faces", "direction": 0, "scale": 2}],
        }
        reply = c.post(f"{url}/v1/edits", json=body)
        assert reply.status_code == 200, reply.text
        assert png_image(reply.content).shape == (64, 64, 3)
        listed = c.get(f"{url}/v1/banks/faces/directions").json()
        assert [d["token"] for d in listed] == ["<faces-0>", "<faces-1>", "<faces-2>"]
        alien = cfg.model_copy(update={"banks": {"shapes": str(BANK)}, "name": "bad", "route_prefix": "/bad"})
        with pytest.raises(BankError) as refused:
            start(alien)
        assert str(refused.value) == (
            "the edit server did not start: bank 'shapes' has 128-dim directions but the model's token "
            f"embeddings are {width}-dim"
        )
        assert "bad" not in serve.status().applications  # not left behind, failing
    finally:
        serve.delete("sd15")


def test_an_sdxl_bank_is_served_with_seeds_prompts_uploads_and_thumbnails(server, tmp_path):
    """The SDXL stand-in (two text encoders) as a second app: a bank of pairs edits a seed with
    its domain prompt, an upload, and draws its thumbnails; an SD bank on it is refused in one line."""
    import torch
    from ray import serve

    from noiseclr.bank import DirectionBank
    from noiseclr.errors import BankError
    from noiseclr.models.base import load_model
    from noiseclr.models.standin import write_sdxl
    from noiseclr.serving.app import start

    folder = write_sdxl(tmp_path / "sdxl")
    model = load_model(str(folder), device="cpu")
    pairs = DirectionBank(
        torch.randn(3, sum(model.token_widths)) * 0.3,
        model.bank_record(),
        name="faces",
        config={"gallery_prompt": "a photo of a face"},  # the domain a request without a prompt gets
    )
    own = pairs.save(tmp_path / "faces")
    cfg = second_app(server, folder, own, "sdxl")
    try:
        url = start(cfg)
        c = server["client"]
        reply = c.post(
            f"{url}/v1/edits", json={"seed": 1, "edits": [{"bank": "faces", "direction": 0, "scale": 2}]}
        )
        assert reply.status_code == 200, reply.text
        assert png_image(reply.content).shape == (64, 64, 3)
        photo = io.BytesIO()
        Image.fromarray(np.full((80, 96, 3), (200, 60, 30), np.uint8)).save(photo, "PNG")
        upload = base64.b64encode(photo.getvalue()).decode()
        reply = c.post(
            f"{url}/v1/edits",
            json={"image": upload, "edits": [{"bank": "faces", "direction": 1, "scale": 1}]},
        )
        assert reply.status_code == 200, reply.text
        assert c.get(f"{url}/v1/banks/faces/directions/2/thumbnail.png").status_code == 200
        alien = cfg.model_copy(
            update={"banks": {"shapes": str(BANK)}, "name": "bad-xl", "route_prefix": "/bad-xl"}
        )
        with pytest.raises(BankError, match=r"learnt on an SD model; .* is SDXL"):
            start(alien)
        assert "bad-xl" not in serve.status().applications
    finally:
        serve.delete("sdxl")
