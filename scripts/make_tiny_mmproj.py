"""Write `tests/fixtures/tiny-mmproj.gguf`: a random-weight llama.cpp vision projector for tests.

    pip install 'tokentill[fixtures]'          # the `gguf` package (dev only; tests never need it)
    python scripts/make_tiny_mmproj.py [--out PATH] [--n-embd-text 576]

The file is a LLaVA-style `mlp` projector (`clip.projector_type = "mlp"`) in front of a 2-layer ViT with
hidden width 32, so libmtmd encodes images with real graphs in a few milliseconds. Its output width is the
text model's `n_embd` (576 for the packaged SmolLM2-135M), so it loads beside that model. The answers it
leads to are noise; the pipeline (preprocessing, slicing, encoding, decoding the embeddings) is real.

Why these choices (llama.cpp `tools/mtmd/clip.cpp`, vendored in the llama-cpp-python sdist):
  * `mlp` adds no marker tokens around images, so it works with any text vocabulary; SmolVLM's own
    `idefics3` needs `<fake_token_around_image>`-style tokens that SmolLM2's vocabulary lacks.
  * `clip.vision.image_grid_pinpoints` switches on LLaVA-UHD slicing: an image larger than one 256x256
    slice costs an overview plus one 16-token slice per grid cell, so `detail` changes the token count:
    a <=256 px image is 16 tokens, a 512 px one 5 x 16 = 80, a 768+ px one 10 x 16 = 160.
  * The FFN width (64) differs from the hidden width (32): clip.cpp swaps ffn_up/ffn_down when they match.
  * `mm.2.weight` must exist: libmtmd reads the projector's output width from it.

Deterministic: a fixed seed, so re-running it reproduces the committed file byte for byte.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SEED = 20240917
IMAGE_SIZE = 256  # one slice, in pixels
PATCH_SIZE = 64  # -> (256 / 64)^2 = 16 tokens per slice
N_EMBD = 32  # ViT hidden width
N_FF = 64  # ViT FFN width: must differ from N_EMBD
N_HEAD = 2
N_LAYER = 2
N_HIDDEN_PROJ = 128  # width between mm.0 and mm.2
PINPOINTS = [256, 256, 512, 512, 768, 768]
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-mmproj.gguf"


def build(out: Path, n_embd_text: int) -> None:
    import gguf  # dev-only dependency: imported here so `--help` works without it

    rng = np.random.default_rng(SEED)

    def weights(*shape: int, scale: float = 0.02, dtype: type = np.float32) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(dtype)

    writer = gguf.GGUFWriter(str(out), arch="clip")
    writer.add_name("tokentill tiny test projector (random weights)")
    writer.add_description("LLaVA-style mlp projector with random weights, for tests only")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.use_gelu", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    writer.add_uint32("clip.vision.patch_size", PATCH_SIZE)
    writer.add_uint32("clip.vision.embedding_length", N_EMBD)
    writer.add_uint32("clip.vision.feed_forward_length", N_FF)
    writer.add_uint32("clip.vision.projection_dim", n_embd_text)
    writer.add_uint32("clip.vision.attention.head_count", N_HEAD)
    writer.add_uint32("clip.vision.block_count", N_LAYER)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_grid_pinpoints", PINPOINTS)

    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    # numpy shapes are ggml's `ne` reversed: a ggml matmul weight ne=[in, out] is numpy (out, in).
    writer.add_tensor("v.patch_embd.weight", weights(N_EMBD, 3, PATCH_SIZE, PATCH_SIZE, dtype=np.float16))
    writer.add_tensor("v.patch_embd.bias", weights(N_EMBD))
    writer.add_tensor("v.position_embd.weight", weights(n_patches, N_EMBD))
    writer.add_tensor("v.pre_ln.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("v.pre_ln.bias", np.zeros(N_EMBD, dtype=np.float32))
    for il in range(N_LAYER):
        prefix = f"v.blk.{il}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"{prefix}.{name}.weight", weights(N_EMBD, N_EMBD))
            writer.add_tensor(f"{prefix}.{name}.bias", weights(N_EMBD))
        for name in ("ln1", "ln2"):
            writer.add_tensor(f"{prefix}.{name}.weight", np.ones(N_EMBD, dtype=np.float32))
            writer.add_tensor(f"{prefix}.{name}.bias", np.zeros(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_up.bias", weights(N_FF))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weights(N_EMBD, N_FF))
        writer.add_tensor(f"{prefix}.ffn_down.bias", weights(N_EMBD))
    writer.add_tensor("mm.0.weight", weights(N_HIDDEN_PROJ, N_EMBD))
    writer.add_tensor("mm.0.bias", weights(N_HIDDEN_PROJ))
    writer.add_tensor("mm.2.weight", weights(n_embd_text, N_HIDDEN_PROJ))
    writer.add_tensor("mm.2.bias", weights(n_embd_text))

    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default {DEFAULT_OUT})")
    parser.add_argument(
        "--n-embd-text", type=int, default=576, help="the text model's n_embd (576 = SmolLM2-135M)"
    )
    args = parser.parse_args()
    build(args.out, args.n_embd_text)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
