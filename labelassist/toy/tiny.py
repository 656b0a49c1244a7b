"""Build CLIP models without a model hub: the real CLIP tokenizer (from the BPE
vocabulary that open_clip's wheel ships) plus a CLIPModel of any size with random
weights, saved with save_pretrained so that load_model reads it like any model.

Tests use tiny configs; benchmarks use the full ViT-B/32 config, which costs the
same compute as pretrained weights. Needs `pip install --no-deps open_clip_torch`
(only its vocabulary file is read; open_clip itself is never imported).
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import json
from functools import lru_cache
from pathlib import Path

from ..errors import ModelLoadError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, used by CLIP's BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


@lru_cache(maxsize=1)
def _bpe_lines() -> tuple[str, ...]:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the CLIP vocabulary comes from open_clip's wheel: "
                             "pip install --no-deps open_clip_torch")
    path = Path(list(spec.submodule_search_locations)[0]) / BPE_FILE
    return tuple(gzip.open(path).read().decode("utf-8").split("\n"))


def save_clip_tokenizer(out_dir: str | Path):
    """Write vocab.json and merges.txt exactly as CLIP's tokenizer uses them."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = list(_bpe_lines()[1:N_MERGES + 1])
    base = list(_bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers >= 5
        tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)},
                                  merges=[tuple(m.split()) for m in merges])
    else:
        tokenizer = CLIPTokenizer(vocab_file=str(out / "vocab.json"),
                                  merges_file=str(out / "merges.txt"))
    tokenizer.save_pretrained(out)
    return tokenizer


def tiny_clip_config(width: int = 64, layers: int = 2, projection: int = 32,
                     image_size: int = 224, patch_size: int = 32):
    from transformers import CLIPConfig

    tower = dict(hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers,
                 num_attention_heads=4)
    return CLIPConfig(text_config=dict(tower, vocab_size=49408, max_position_embeddings=77),
                      vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
                      projection_dim=projection)


def vit_l14_config():
    """OpenAI's ViT-L/14 (224 px) shape: for speed work with random weights."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=224, patch_size=14),
        projection_dim=768)


def save_random_clip(out_dir: str | Path, config=None, seed: int = 0) -> Path:
    """A CLIPModel with random weights (ViT-B/32 when config is None), its tokenizer and
    its image processor, in a directory that load_model accepts."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(seed)
    out = Path(out_dir)
    CLIPModel(config or CLIPConfig()).eval().save_pretrained(out)
    crop = (config or CLIPConfig()).vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": crop},
                          crop_size={"height": crop, "width": crop}).save_pretrained(out)
    save_clip_tokenizer(out)
    return out


def save_random_siglip(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny SigLIP with random weights (and SigLIP's own logit scale and bias at their
    published initial values, log 10 and -10), the CLIP tokenizer (SigLIP's own is a
    SentencePiece model that is not available offline) and a SigLIP image processor."""
    import math

    import torch
    import transformers
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    out = Path(out_dir)
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4)
    end = 49407  # <|endoftext|> in the CLIP vocabulary: SigLIP pads with it too
    config = SiglipConfig(
        text_config=dict(tower, vocab_size=49408, max_position_embeddings=16,
                         pad_token_id=end, eos_token_id=end, bos_token_id=end - 1),
        vision_config=dict(tower, image_size=32, patch_size=8))
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    model.save_pretrained(out)
    processor = getattr(transformers, "SiglipImageProcessorPil", None) \
        or transformers.SiglipImageProcessor
    processor(size={"height": 32, "width": 32}).save_pretrained(out)
    save_clip_tokenizer(out)
    return out
