"""Composite experts over HTTP: listed, run by `model` or `adapters`, reported, uploaded, deleted, refused."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from safetensors.torch import load_file, save_file

from loramux.adapters_store.synthetic import write_random_adapter
from loramux.composites.synthetic import write_random_mole, write_random_mor, write_random_more
from loadtest.server_process import ServerProcess
from tests.conftest import metric_values

ADMIN_KEY = "admin-key"


@pytest.fixture(scope="module")
def folders(tiny_llama_dir, tmp_path_factory):
    from transformers import AutoConfig

    from loramux.engine.model import ModelShape

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_llama_dir))
    shapes = shape.lora_target_shapes()
    root = tmp_path_factory.mktemp("composite-server")
    serving = root / "serving"
    for i in range(3):
        write_random_adapter(serving / f"ad{i}", shapes, shape.num_layers, rank=4 * (i + 1), seed=i, b_std=0.5)
    write_random_mole(serving / "mole", ["ad0", "ad1", "ad2"], shape.num_layers, shape.hidden_size, seed=5)
    write_random_more(serving / "more", shapes, shape.num_layers, rank=8, rank_choices=[2, 8], tasks=["a", "b"],
                      seed=6, b_std=0.5)
    write_random_mor(root / "mor", shapes, shape.num_layers, shape.hidden_size, num_experts=3, rank=4, seed=7,
                     b_std=0.5)
    return root


@pytest.fixture(scope="module")
def server(tiny_llama_dir, folders):
    proc = ServerProcess(["--model", str(tiny_llama_dir), "--dtype", "float32", "--served-model-name", "tiny",
                          "--num-kv-blocks", "256",
                          "--adapter-dir", str(folders / "serving"), "--adapter-store", str(folders / "store"),
                          "--admin-api-key", ADMIN_KEY, "--max-loras", "12", "--max-composite-members", "4",
                          "--max-mor-experts", "5",
                          "--adapter-load-root", str(folders)],
                         folders / "server.log")
    yield proc
    proc.stop()


def http(server):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)


def complete(server, **body):
    with http(server) as c:
        return c.post("/v1/completions", json={"prompt": "one two three", "max_tokens": 6, "temperature": 0,
                                               "ignore_eos": True} | body)


def upload(server, name, folder, weights=None):
    files = {"loramux_composite.json": ("loramux_composite.json", (folder / "loramux_composite.json").read_bytes()),
             "composite.safetensors": ("composite.safetensors",
                                       weights if weights is not None else (folder / "composite.safetensors").read_bytes())}
    with http(server) as c:
        return c.post("/v1/adapters", files=files, data={"name": name})


def names(server, path="/v1/adapters"):
    with http(server) as c:
        return sorted(a.get("name", a.get("id")) for a in c.get(path).json()["data"])


def test_listed_and_run_by_model_or_adapters(server):
    with http(server) as c:
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert models["mole"]["composite"] == {"type": "mole", "members": ["ad0", "ad1", "ad2"], "tasks": []}
    assert models["more"]["composite"]["tasks"] == ["a", "b"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    by_model = client.completions.create(model="mole", prompt="one two three", max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True, "composite": {"per_layer": True}})
    report = by_model.model_extra["loramux"]["composite"]
    assert report["name"] == "mole" and math.isclose(sum(report["gates"].values()), 1.0, rel_tol=1e-5)
    assert len(report["gates_per_layer"]) == 2 and 0 < report["gate_entropy"] <= math.log(3)
    by_adapters = complete(server, model="tiny", adapters=[{"name": "mole"}]).json()
    assert by_adapters["choices"][0]["text"] == by_model.choices[0].text
    base = complete(server, model="tiny").json()["choices"][0]["text"]
    assert by_model.choices[0].text != base
    masked = complete(server, model="mole", composite={"mask": ["ad1", "ad2"]}).json()
    single = complete(server, model="ad0").json()
    assert masked["choices"][0]["text"] == single["choices"][0]["text"]  # only ad0 left: gate 1 on it
    assert masked["loramux"]["composite"]["gates"] == {"ad0": 1.0, "ad1": 0.0, "ad2": 0.0}
    more = complete(server, model="more", composite={"task": "b"}).json()
    assert more["loramux"]["composite"] == {"name": "more", "type": "more", "task": "b"}


def test_metrics_count_composites_by_type(server):
    before = metric_values(server)
    assert complete(server, model="mole").status_code == 200
    assert complete(server, model="more").status_code == 200  # default task
    after = metric_values(server)
    for kind in ("mole", "more"):
        key = ("loramux_composite_requests_total", (("type", kind),))
        assert after[key] - before.get(key, 0) == 1
    count = ("loramux_composite_gate_entropy_count", ())
    assert after[count] - before.get(count, 0) == 1  # MoRE has no gate


@pytest.mark.parametrize("body, status, param_code", [
    ({"model": "mole", "composite": {"top_k": 7}}, 400, "invalid_option"),
    ({"model": "mole", "composite": {"mask": ["zz"]}}, 400, "invalid_option"),
    ({"model": "more", "composite": {"task": "zz"}}, 400, "invalid_option"),
    ({"model": "tiny", "composite": {"top_k": 1}}, 400, None),
    ({"model": "tiny", "adapters": ["mole", "ad0"]}, 400, "invalid_request"),
    ({"model": "tiny", "adapters": [{"name": "ad0", "task": "a"}]}, 400, "invalid_request"),
    ({"model": "nope"}, 404, "model_not_found"),
])
def test_bad_composite_requests(server, body, status, param_code):
    r = complete(server, **body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"] and r.json()["error"]["code"] == param_code


def test_upload_use_delete(server, folders):
    before = names(server)
    bad = load_file(folders / "mor" / "composite.safetensors")
    bad["layers.0.gate.weight"][0, 0] = float("nan")
    path = folders / "bad.safetensors"
    save_file(bad, path)
    r = upload(server, "mor", folders / "mor", weights=path.read_bytes())
    assert r.status_code == 422 and r.json()["error"]["code"] == "non_finite_weights"
    assert names(server) == before
    r = upload(server, "mor", folders / "mor")
    assert r.status_code == 201, r.text
    assert r.json()["type"] == "mor" and r.json()["members"] == ["mor.expert0", "mor.expert1", "mor.expert2"]
    assert upload(server, "mor", folders / "mor").status_code == 409
    out = complete(server, model="mor").json()
    assert sorted(out["loramux"]["composite"]["gates"]) == ["mor.expert0", "mor.expert1", "mor.expert2"]
    assert (folders / "store" / "mor" / "composite.safetensors").is_file()
    with http(server) as c:
        assert c.delete("/v1/adapters/mor").status_code == 200
    assert complete(server, model="mor").status_code == 404
    assert names(server) == before and not (folders / "store" / "mor").exists()


def test_mor_beyond_the_scaling_vector_pools_is_refused_and_nothing_is_stored(server, folders):
    """The server holds 5 MoR experts (--max-mor-experts 5): a second 3-expert MoR gets its own 422 in the
    OpenAI error format, nothing stored; once the first is deleted its rows take the second."""
    assert upload(server, "mor-a", folders / "mor").status_code == 201
    before = names(server)
    r = upload(server, "mor-b", folders / "mor")
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "too_many_mor_experts" and "--max-mor-experts" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert names(server) == before and not (folders / "store" / "mor-b").exists()
    with http(server) as c:
        assert c.delete("/v1/adapters/mor-a").status_code == 200
    assert upload(server, "mor-b", folders / "mor").status_code == 201
    assert complete(server, model="mor-b").status_code == 200
    with http(server) as c:
        assert c.delete("/v1/adapters/mor-b").status_code == 200


def test_loaded_from_a_server_path_and_deleted_without_touching_its_folder(server, folders):
    with http(server) as c:
        r = c.post("/v1/adapters/load", json={"name": "mor-loaded", "path": "mor"})
        assert r.status_code == 201, r.text
        assert r.json()["type"] == "mor" and not r.json()["uploaded"]
        assert c.post("/v1/adapters/load", json={"name": "mor-loaded", "path": "mor"}).status_code == 409
    assert sorted(complete(server, model="mor-loaded").json()["loramux"]["composite"]["gates"]) == [
        "mor-loaded.expert0", "mor-loaded.expert1", "mor-loaded.expert2"]
    with http(server) as c:
        assert c.delete("/v1/adapters/mor-loaded").status_code == 200
    assert (folders / "mor" / "composite.safetensors").is_file()
    assert complete(server, model="mor-loaded").status_code == 404


def test_deleted_member_gives_a_clear_error(server, folders):
    with http(server) as c:
        r = c.post("/v1/adapters", files={
            "adapter_config.json": ("adapter_config.json", (folders / "serving" / "ad2" / "adapter_config.json")
                                    .read_bytes()),
            "adapter_model.safetensors": ("adapter_model.safetensors",
                                          (folders / "serving" / "ad2" / "adapter_model.safetensors").read_bytes())},
            data={"name": "tmp-member"})
        assert r.status_code == 201
    write_random_mole(folders / "mole3", ["ad0", "tmp-member"], 2, 64, seed=9)
    assert upload(server, "mole3", folders / "mole3").status_code == 201
    assert complete(server, model="mole3").status_code == 200
    with http(server) as c:
        assert c.delete("/v1/adapters/tmp-member").status_code == 200
    r = complete(server, model="mole3")
    assert r.status_code == 400 and "member 'tmp-member' of composite 'mole3' was deleted" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "member_not_found"
