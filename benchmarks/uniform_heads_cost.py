"""What ``uniform_heads`` costs on the two tiny Hugging Face configs of tests/test_heads.py.

The masks are set as in those tests (posteriors of the named heads collapsed to the prior's lower
end, the others kept), then ``prune(model, "bmrs_n", uniform_heads=True)`` prints its report: the
heads every attention keeps and the parameters kept on top of the masks (docs/shrink.md,
"Attention heads").  Random weights, no data: a few seconds on one CPU thread.

    .venv/bin/python benchmarks/uniform_heads_cost.py
"""

import os

import torch
import transformers as tf

import bayesprune as bp
from bayesprune import heads


def collapse(model, dead: dict, seed: int = 0) -> None:
    """Posteriors of the heads ``dead[layer]`` collapsed to the prior's lower end (BMRS_N removes
    them), the others spread around mu in (-0.5, 0) with small sigma (kept); tests/test_heads.py
    sets its masks with it too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in heads.head_noise_layers(model):
            n.mu.copy_(-0.5 * torch.rand(n.mu.shape, generator=g))
            n.log_sigma.fill_(-4.0)
            for i in dead.get(n.layer_name, ()):
                n.mu[i], n.log_sigma[i] = -19.0, 0.0


def main():
    torch.set_num_threads(1)
    print("load average:", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    torch.manual_seed(10)
    cfg = tf.ViTConfig(image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=32, num_labels=3)
    vit = tf.ViTForImageClassification(cfg).eval()
    heads.add_head_noise(vit, torch.randn(2, 3, 16, 16))
    collapse(vit, {"vit.layers.0.attention": [0, 3], "vit.layers.1.attention": [2]})
    print("ViT (2 layers, 4 heads of 6):")
    print(bp.prune(vit, "bmrs_n", uniform_heads=True))

    torch.manual_seed(12)
    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=48, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=8, intermediate_size=48, max_position_embeddings=16,
                         use_cache=False)
    llama = tf.LlamaModel(cfg).eval()
    heads.add_head_noise(llama, {"input_ids": torch.randint(0, 50, (2, 7))})
    collapse(llama, {"layers.0.self_attn": [0, 2, 3], "layers.1.self_attn": [0, 1, 2, 3]})
    print("Llama (2 layers, 8 query heads in 4 key/value groups):")
    print(bp.prune(llama, "bmrs_n", uniform_heads=True))


if __name__ == "__main__":
    main()
