"""The environment report: rows, statuses, weight look-ups without the network."""

import socket

import pytest

from utils.notebook import env


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the environment report tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, laid out as huggingface_hub writes it."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def cache_files(cache, repo_id, names):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in names:
        (snapshot / name).write_text("x")
    return snapshot


def test_report_names_torch_and_a_marching_cubes_backend(no_network, hub_cache):
    rows = env.environment_report()
    by_name = {row.component: row for row in rows}
    for component in ("Python", "torch", "CUDA", "bf16", "transformers", "peft", "trimesh"):
        assert component in by_name
    assert by_name["torch"].status == "OK"
    assert by_name["marching cubes"].status == "OK"  # PyMCubes is a hard dependency
    # The cache is empty, but the notebooks default to the shipped model: not a red "missing".
    assert by_name["TripoSR weights"].status == "optional"
    assert all(row.status in env.STATUS_COLORS for row in rows)
    assert all(row.fix for row in rows if row.status != "OK")  # every problem says what to do


def test_transformers_5_is_a_warning(monkeypatch):
    real_version = env._version
    monkeypatch.setattr(
        env, "_version", lambda dist: "5.0.0" if dist == "transformers" else real_version(dist)
    )
    row = env._transformers_row()
    assert row.status == "warn" and "renames" in row.details and "<5" in row.fix


def test_optional_packages_warn_instead_of_failing():
    row = env._package_row("surely_not_installed_pkg", "surely-not-installed-pkg", "x", True)
    assert row.status == "optional" and row.fix == "pip install surely-not-installed-pkg"
    assert env._package_row("surely_not_installed_pkg", "surely-not", "x").status == "missing"


def test_weights_in_a_local_folder(tmp_path):
    assert env.weights_status(tmp_path).status == "missing"
    assert "model.ckpt" in env.weights_status(tmp_path).details
    for name in env.WEIGHT_FILES:
        (tmp_path / name).write_text("x")
    assert env.weights_status(tmp_path).status == "OK"
    row = env.weights_status(tmp_path / "no" / "such" / "folder")
    assert row.status == "missing" and "no such folder" in row.details


def test_weights_in_the_hub_cache_are_found_offline(no_network, hub_cache):
    assert env.weights_status("stabilityai/TripoSR").status == "missing"
    optional = env.weights_status("stabilityai/TripoSR", required=False)
    assert optional.status == "optional" and "shipped model" in optional.details
    assert "hf_hub_download" in optional.fix  # still says how to get them
    snapshot = cache_files(hub_cache, "stabilityai/TripoSR", env.WEIGHT_FILES)
    row = env.weights_status("stabilityai/TripoSR")
    assert row.status == "OK" and str(snapshot) in row.details


def test_half_cached_weights_name_the_missing_file(no_network, hub_cache):
    cache_files(hub_cache, "stabilityai/TripoSR", ["config.yaml"])
    row = env.weights_status("stabilityai/TripoSR")
    assert row.status == "missing" and "model.ckpt" in row.details
    assert "hf_hub_download" in row.fix and "config.yaml" not in row.fix


def test_html_and_text_tables_have_a_line_per_row_and_escape_text():
    rows = [
        env.EnvRow("torch", "OK", "2.4", ""),
        env.EnvRow("weights", "missing", "<none>", "download them"),
    ]
    page = env.render_report_html(rows)
    assert page.count("<tr>") == 1 + len(rows)  # header + rows
    assert "&lt;none&gt;" in page and "<none>" not in page
    assert env.STATUS_COLORS["missing"] in page
    text = env.format_report_text(rows)
    assert len(text.splitlines()) == 2 and "-> download them" in text


def test_a_row_shown_alone_is_a_table_not_a_dataclass_repr():
    row = env.EnvRow("TripoSR weights", "optional", "not in the cache", "download them")
    page = row._repr_html_()
    assert page.startswith("<table>") and page.count("<tr>") == 2
    assert env.STATUS_COLORS["optional"] in page and "EnvRow(" not in page
