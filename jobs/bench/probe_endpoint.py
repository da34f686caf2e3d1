"""Probe the edit endpoint with what its tests do not send, then load it with an external generator.

    python jobs/bench/probe_endpoint.py                      # jobs/serve-shapes.yaml on CPU, out/probe
    python jobs/bench/probe_endpoint.py --seconds 20 --clients 1 4 8 16 64

Starts a local Ray and the Serve app (the real HTTP proxy on 127.0.0.1, one replica), then:
1. probe: every request field given every JSON type and out-of-range value it does not
   document, every route asked with the methods it lacks, oversized headers and URLs, uploads
   in the formats cameras and editors write and in ones the API does not take, labels of every
   type; each answer's status, and whether a 4xx carried a JSON error (never a 5xx or a dropped
   connection); afterwards a good edit must still answer and the labels file be intact;
2. load: Debian's `hey` (apt install hey) for `--seconds` at each client count, POST /v1/edits:
   requests/s, p50/p99, and the status codes (503 with Retry-After once the queue is full).
Writes OUT/probe.md, OUT/load.md and OUT/probe.json. `probe()` is also what
tests/test_serving.py runs against its server.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

JSON_VALUES = {
    "null": None,
    "true": True,
    "1.5": 1.5,
    "-1": -1,
    "2^40": 2**40,
    '"x"': "x",
    "[]": [],
    "{}": {},
}


def encoded(img: Image.Image, fmt: str, **kw) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return base64.b64encode(buf.getvalue()).decode()


def uploads() -> dict[str, str]:
    """Base64 images: what cameras and editors write (to be edited), and formats the API refuses."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    exif = rgb.getexif()
    exif[0x0112] = 6  # "rotate 90": a phone's portrait JPEG
    return {
        "RGBA PNG": encoded(rgb.convert("RGBA"), "PNG"),
        "grey+alpha PNG": encoded(rgb.convert("LA"), "PNG"),
        "1-bit PNG": encoded(rgb.convert("1"), "PNG"),
        "progressive JPEG": encoded(rgb, "JPEG", progressive=True),
        "1 x 1 PNG": encoded(Image.new("RGB", (1, 1)), "PNG"),
        "palette PNG, transparent": encoded(rgb.convert("P"), "PNG", transparency=0),
        "16-bit PNG": encoded(Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)), "PNG"),
        "CMYK JPEG": encoded(rgb.convert("CMYK"), "JPEG"),
        "rotated JPEG (EXIF)": encoded(rgb, "JPEG", exif=exif),
        "animated WebP": encoded(rgb, "WEBP", save_all=True, append_images=[rgb.rotate(90)]),
        "1 x 4000 PNG": encoded(Image.new("RGB", (1, 4000)), "PNG"),
        "GIF": encoded(rgb, "GIF"),
        "TIFF": encoded(rgb, "TIFF"),
        "BMP": encoded(rgb, "BMP"),
        "SVG text": base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode(),
    }


def cases(bank: str) -> list[tuple[str, str, str, dict]]:
    """(what, method, path, httpx request kwargs) for every probe."""
    good = {"bank": bank, "direction": 0, "scale": 1}
    out: list[tuple[str, str, str, dict]] = []
    top = {"seed": 1, "prompt": None, "image": None, "steps": 4, "guidance": 1.0, "format": "png"}
    for field in [*top, "edits"]:
        for name, value in JSON_VALUES.items():
            body = {"seed": 1, "steps": 4, "edits": [good], field: value}
            out.append((f"{field} = {name}", "POST", "/v1/edits", {"json": body}))
    for field in good | {"t_high": 500, "t_low": 0}:
        for name, value in JSON_VALUES.items():
            out.append(
                (
                    f"edits[0].{field} = {name}",
                    "POST",
                    "/v1/edits",
                    {"json": {"steps": 4, "edits": [{**good, field: value}]}},
                )
            )
    for name, value in JSON_VALUES.items():  # (a string is a label: set deliberately, not probed)
        if isinstance(value, str):
            continue
        out.append(
            (f"label = {name}", "PUT", f"/v1/banks/{bank}/directions/1/label", {"json": {"label": value}})
        )
    for what, data in uploads().items():
        out.append(
            (f"upload: {what}", "POST", "/v1/edits", {"json": {"image": data, "steps": 4, "edits": [good]}})
        )
    routes = {
        "/v1/edits": "POST",
        "/v1/health": "GET",
        "/v1/banks": "GET",
        f"/v1/banks/{bank}/directions": "GET",
        f"/v1/banks/{bank}/directions/0/thumbnail.png": "GET",
        f"/v1/banks/{bank}/directions/0/label": "PUT",
    }
    for path, allowed in routes.items():
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            if method != allowed:
                out.append((f"{method} {path}", method, path, {}))
    out += [
        ("a 64 KiB header", "POST", "/v1/edits", {"json": {"seed": 1}, "headers": {"x-pad": "a" * 65536}}),
        ("a 16 KiB URL", "GET", "/v1/banks/" + "a" * 16384 + "/directions", {}),
        ("a JSON array body", "POST", "/v1/edits", {"json": [1, 2]}),
        ("a JSON string body", "POST", "/v1/edits", {"json": "seed"}),
        (
            "empty body",
            "POST",
            "/v1/edits",
            {"content": b"", "headers": {"content-type": "application/json"}},
        ),
        (
            "invalid UTF-8",
            "POST",
            "/v1/edits",
            {"content": b'{"prompt": "\xff\xfe"}', "headers": {"content-type": "application/json"}},
        ),
        (
            "JSON nested 10000 deep",
            "POST",
            "/v1/edits",
            {"content": b"[" * 10000 + b"]" * 10000, "headers": {"content-type": "application/json"}},
        ),
        (
            "duplicate keys",
            "POST",
            "/v1/edits",
            {"content": b'{"seed": 1, "seed": -5}', "headers": {"content-type": "application/json"}},
        ),
    ]
    return out


def probe(client: httpx.Client, bank: str) -> list[dict]:
    """Send every case; per case its status (0: the connection dropped) and whether an error
    answer was JSON with an `error` field."""
    rows = []
    for what, method, path, kw in cases(bank):
        try:
            r = client.request(method, path, **kw)
            code = r.status_code
            try:
                error = r.json().get("error") if code >= 400 else None
            except (ValueError, AttributeError):
                error = None
        except httpx.TransportError as err:
            code, error = 0, f"dropped: {type(err).__name__}"
        rows.append({"what": what, "code": code, "error": error})
    return rows


def hey(url: str, body: dict, clients: int, seconds: float, key: str | None = None) -> dict:
    """Debian's hey against URL (POST body): requests/s, p50/p99, status counts, errors."""
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(clients), "-m", "POST", "-T", "application/json"]
    cmd += ["-H", f"X-API-Key: {key}"] if key else []
    out = subprocess.run(
        [*cmd, "-d", json.dumps(body), url], capture_output=True, text=True, timeout=seconds + 120, check=True
    ).stdout
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    errors = out.split("Error distribution:")[1].strip() if "Error distribution:" in out else ""
    pct = {p: float(v) for p, v in re.findall(r"(\d+)% in ([\d.]+) secs", out)}
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return {
        "clients": clients,
        "codes": codes,
        "errors": errors,
        "p50": pct.get("50"),
        "p99": pct.get("99"),
        "rps": rate,
    }


def load_table(load: list[dict], seconds: float) -> list[str]:
    """hey's figures per client count; its latencies are of every answer, 503s included."""
    table = [
        "| clients | 200s per s | answers per s | p50 (s) | p99 (s) | status codes | transport errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in load:
        ok = r["codes"].get(200, 0) / seconds
        codes = ", ".join(f"{c}: {n}" for c, n in sorted(r["codes"].items()))
        table.append(
            f"| {r['clients']} | {ok:.1f} | {r['rps']:.1f} | {r['p50'] or '-'} | {r['p99'] or '-'} "
            f"| {codes} | {r['errors'] or 'none'} |"
        )
    return table


def json_error(row: dict) -> str:
    if row["code"] and row["code"] < 400:
        return "-"
    return "yes" if row["error"] else "no"


def main() -> None:
    import ray
    from ray import serve

    from noiseclr.serving.app import build
    from noiseclr.serving.config import ServeConfig
    from noiseclr.tracking.server import free_port

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="jobs/serve-shapes.yaml")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", default=None, help='the load prompt ("" for none); default: not sent')
    ap.add_argument("--out", default="out/probe")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ServeConfig.from_yaml(
        args.config, port=free_port(), device=args.device, labels_dir=str(out / "labels")
    )
    cfg = cfg.model_copy(update={"replicas": cfg.replicas.model_copy(update={"num_replicas": 1})})
    bank = next(iter(cfg.banks))
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location=cfg.proxy_location, http_options={"host": cfg.host, "port": cfg.port})
    try:
        serve.run(build(cfg), name=cfg.name, route_prefix="/")
        url = f"http://{cfg.host}:{cfg.port}"
        with httpx.Client(base_url=url, timeout=120) as c:
            c.put(f"/v1/banks/{bank}/directions/1/label", json={"label": "probe-kept"})
            labels = {p.name: p.read_bytes() for p in (out / "labels").glob("*.json")}
            rows = probe(c, bank)
            after = c.post(
                "/v1/edits",
                json={"seed": 1, "steps": 4, "edits": [{"bank": bank, "direction": 0, "scale": 1}]},
            )
            intact = labels == {p.name: p.read_bytes() for p in (out / "labels").glob("*.json")}
        lines = ["| input | status | JSON error |", "|---|---|---|"]
        lines += [f"| {r['what']} | {r['code'] or 'dropped'} | {json_error(r)} |" for r in rows]
        lines += [
            "",
            f"{len(rows)} probes; 5xx or dropped: {sum(r['code'] >= 500 or r['code'] == 0 for r in rows)}; "
            f"a good edit afterwards: {after.status_code}; labels file intact: {intact}",
        ]
        (out / "probe.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines[-1:]), flush=True)
        load = []
        if shutil.which("hey"):
            body = {"seed": 1, "steps": args.steps, "edits": [{"bank": bank, "direction": 0, "scale": 1}]}
            if args.prompt is not None:  # without one the server edits the bank's domain prompt (CFG)
                body["prompt"] = args.prompt
            hey(f"{url}/v1/edits", body, 1, 3)  # warm-up
            for n in args.clients:
                load.append(hey(f"{url}/v1/edits", body, n, args.seconds))
                print(load[-1], flush=True)
                time.sleep(2)
            table = load_table(load, args.seconds)
            (out / "load.md").write_text("\n".join(table) + "\n")
        (out / "probe.json").write_text(
            json.dumps(
                {"probe": rows, "after": after.status_code, "labels_intact": intact, "load": load}, indent=1
            )
        )
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
