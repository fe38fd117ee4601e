"""Hub downloads fetch one weight layout: huggingface_hub's functions are replaced by a fake repo (no network)."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
from huggingface_hub.utils import filter_repo_objects

from minikv.loader import resolve_model_dir

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
METADATA = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "tokenizer.model"]
# A Mistral repo: Hugging Face shards and mistral-inference's consolidated file, side by side.
MISTRAL_REPO = [*METADATA, "model.safetensors.index.json", *SHARDS, "consolidated.safetensors", "params.json",
                "README.md", ".gitattributes"]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A Hub with one repo whose files are `repo_files`; returns the list of files each download fetched."""
    state = {"files": [], "fetched": []}
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    class FakeApi:
        def list_repo_files(self, repo_id):
            return list(state["files"])

    def hf_hub_download(repo_id, filename, **kwargs):
        assert filename in state["files"]
        state["fetched"].append(filename)
        path = tmp_path / filename
        path.write_text(json.dumps({"weight_map": {f"layer.{i}": shard for i, shard in enumerate(SHARDS * 3)}}))
        return str(path)

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kwargs):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        state["fetched"].extend(filter_repo_objects(state["files"], allow_patterns=allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return state


def test_mistral_repo_downloads_the_shards_not_consolidated(fake_hub):
    fake_hub["files"] = MISTRAL_REPO
    resolve_model_dir("mistralai/Mistral-7B-Instruct-v0.3")
    fetched = fake_hub["fetched"]
    assert set(fetched) == {*METADATA, "model.safetensors.index.json", *SHARDS, "params.json"}
    assert "consolidated.safetensors" not in fetched


def test_single_file_repo_downloads_model_safetensors_only(fake_hub):
    fake_hub["files"] = [*METADATA, "model.safetensors", "consolidated.safetensors"]
    resolve_model_dir("org/single")
    assert set(fake_hub["fetched"]) == {*METADATA, "model.safetensors"}


def test_other_layouts_download_every_safetensors_file(fake_hub):
    fake_hub["files"] = [*METADATA, "weights.safetensors"]
    resolve_model_dir("org/other")
    assert set(fake_hub["fetched"]) == {*METADATA, "weights.safetensors"}
