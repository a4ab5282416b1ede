"""BiomedCLIP-style model folders (open_clip's Hugging Face layout, HF text tower) from local files only.

A random-weight model of BiomedCLIP's architecture in small sizes: timm's `test_vit` image tower (BiomedCLIP: timm
`vit_base_patch16_224`, no pooling, linear projection), a tiny BERT text tower (BiomedCLIP: PubMedBERT) with its
MLP projection and CLS pooler, context length 256, and a WordPiece tokenizer built here from a small vocabulary. The
folder holds what a download of the hub repository holds (`open_clip_config.json`, `open_clip_pytorch_model.bin`,
tokenizer files) plus the text tower's `config.json`. The oracle is open_clip's own `local-dir:` loader on a copy whose
config points the text tower at local files (the workaround its users apply by hand).
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from samadapt.encoders.clip import load_clip
from samadapt.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")

HUB_TEXT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
WORDS = (
    "this is a photo of adenocarcinoma squamous cell carcinoma histopathology chest x ray normal left right "
    "sided pleural effusion nevus melanoma benign malignant lesion tumor tissue image"
).split()


def _model_cfg(text_source: str) -> dict:
    return {
        "embed_dim": 32,
        "vision_cfg": {
            "timm_model_name": "test_vit",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 160,
        },
        "text_cfg": {
            "hf_model_name": text_source,
            "hf_tokenizer_name": text_source,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    }


def _write_config(folder: Path, text_source: str) -> None:
    config = {
        "model_cfg": _model_cfg(text_source),
        "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def biomedclip(tmp_path_factory) -> tuple[Path, Path]:
    """(the folder as downloaded + the text config, an oracle copy whose config names local folders)."""
    root = tmp_path_factory.mktemp("biomedclip")
    folder = root / "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    folder.mkdir()
    vocab = folder / "vocab.txt"
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters, "-"]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(str(folder))
    bert = transformers.BertConfig(
        vocab_size=len(vocab.read_text().split()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    bert.save_pretrained(str(folder))  # config.json
    oracle = root / "oracle"
    shutil.copytree(folder, oracle)
    _write_config(oracle, str(oracle))
    torch.manual_seed(0)
    model = open_clip.create_model("local-dir:" + str(oracle), pretrained_text=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    shutil.copy(folder / "open_clip_pytorch_model.bin", oracle / "open_clip_pytorch_model.bin")
    _write_config(folder, HUB_TEXT)  # as the hub repository ships it: the text tower named by its hub id
    return folder, oracle


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_folder_loads_offline_and_equals_open_clip(biomedclip, no_network, real_images: dict) -> None:
    folder, oracle_dir = biomedclip
    clip = load_clip(str(folder), None)
    oracle, _, oracle_preprocess = open_clip.create_model_and_transforms("local-dir:" + str(oracle_dir))
    oracle.eval()
    oracle_tokenizer = open_clip.get_tokenizer("local-dir:" + str(oracle_dir))

    assert clip.checkpoint == folder / "open_clip_pytorch_model.bin" and len(clip.checkpoint_sha256) == 64
    assert clip.context_length == 256 and clip.default_template == "this is a photo of {class}"
    assert clip.image_size == 160 and clip.patch_grid == 10
    texts = [clip.default_template.replace("{class}", c) for c in ("adenocarcinoma histopathology", "nevus")]
    tokens = clip.tokenize(texts)
    assert tokens.shape == (2, 256) and torch.equal(tokens, oracle_tokenizer(texts))
    with torch.no_grad():
        want_text = oracle.encode_text(tokens, normalize=True)
        got_text = clip.encode_text(texts)
        image = real_images["ihc"]
        x = clip.preprocess(image)
        assert torch.equal(x, oracle_preprocess(clip_pil(image)))
        got_image = clip.model.encode_image(x[None])
        want_image = oracle.encode_image(x[None])
    assert got_text.shape == (2, 32)
    assert (got_text - want_text).abs().max() <= 1e-5
    assert (got_image - want_image).abs().max() <= 1e-4 * want_image.abs().max()
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert clip.quick_gelu_source.startswith("not applicable")


def clip_pil(image: np.ndarray):
    from samadapt.encoders.clip import to_pil_rgb

    return to_pil_rgb(image)


def test_local_dir_prefix_and_explicit_checkpoint(biomedclip, no_network, tmp_path: Path) -> None:
    folder, _ = biomedclip
    moved = tmp_path / "weights.bin"
    shutil.copy(folder / "open_clip_pytorch_model.bin", moved)
    a = load_clip("local-dir:" + str(folder), None)
    b = load_clip(str(folder), moved)
    assert b.checkpoint == moved
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key])


def test_text_config_and_tokenizer_from_the_hugging_face_cache(
    biomedclip, no_network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder with only the CLIP repository's files works when the text model is in the local HF cache."""
    import huggingface_hub.constants

    folder, _ = biomedclip
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("open_clip_config.json", "open_clip_pytorch_model.bin"):
        shutil.copy(folder / name, bare / name)
    cache = tmp_path / "hub"
    snapshot = cache / ("models--" + HUB_TEXT.replace("/", "--")) / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "tokenizer.json"):
        shutil.copy(folder / name, snapshot / name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    clip = load_clip(str(bare), None)
    assert clip.tokenize(["nevus"]).shape == (1, 256)
    assert clip.model_cfg["text_cfg"]["hf_model_name"] == str(snapshot)


@pytest.mark.parametrize(
    ("missing", "error", "message"),
    [
        ("open_clip_config.json", ConfigError, r"missing open_clip_config\.json"),
        ("open_clip_pytorch_model.bin", CheckpointError, r"missing open_clip_pytorch_model\.bin"),
        ("config.json", ConfigError, r"missing config\.json, the Hugging Face config of its text tower"),
        ("vocab.txt", ConfigError, r"missing vocab\.txt \(or tokenizer\.json\)"),
    ],
)
def test_missing_file_is_one_line_naming_it(
    biomedclip, no_network, tmp_path, missing, error, message
) -> None:
    folder, _ = biomedclip
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / missing).unlink()
    if missing == "vocab.txt":
        (broken / "tokenizer.json").unlink()
    with pytest.raises(error, match=message) as info:
        load_clip(str(broken), None)
    assert str(broken) in str(info.value) and "\n" not in str(info.value)


def test_fewshot_train_and_predict_with_a_biomedclip_folder(biomedclip, tmp_path: Path, capsys) -> None:
    """`samadapt train --task fewshot --clip <BiomedCLIP folder>` end to end (no --clip-checkpoint: the folder's
    own weights), then predict with the run; a folder missing its weights is one line naming the file."""
    from PIL import Image

    from samadapt.cli.main import main
    from samadapt.tasks.fewshot.synthetic import write_toy_npz

    folder, _ = biomedclip
    data = write_toy_npz(tmp_path / "toy.npz", size=160)
    run = tmp_path / "run"
    argv = ["train", "--task", "fewshot", "--data", str(data), "--method", "linear-probe", "--clip", str(folder),
            "--class-names", "nevus,melanoma", "--prompt-template", "this is a photo of {class}", "--no-progress",
            "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    import yaml

    identity = yaml.safe_load((run / "config.yaml").read_text())["recorded"]["clip_identity"]
    assert identity["clip_checkpoint_sha256"], "the folder's own weights were loaded, not random ones"
    assert json.loads((run / "metrics.json").read_text())["n_train"] == 12
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(images / "a.png")
    assert main(["predict", "--run", str(run), "--images", str(images), "--out", str(tmp_path / "pred"),
                 "--no-progress"]) == 0  # fmt: skip
    assert (
        (tmp_path / "pred" / "predictions.csv")
        .read_text()
        .startswith("id,predicted,prob_nevus,prob_melanoma")
    )
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "open_clip_pytorch_model.bin").unlink()
    argv[argv.index(str(folder))] = str(broken)
    argv[-1] = str(tmp_path / "r2")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "broken" in err[0] and ("open_clip_pytorch_model" in err[0] or "weights" in err[0])
    )
