"""Random model weights for the tests, with attention that has contrast."""
import torch

WAN_QK_GAINS = ("self_attn.norm_q.weight", "self_attn.norm_k.weight")   # Wan self-attention q/k RMSNorm gains


def fill_random(model, rng, gains=(), gain=1.0, scale=0.05):
    """Every parameter N(0, scale^2), except those whose names end with one of `gains` (q/k RMSNorm weights):
    gain x (1 + 10% noise). q and k are RMS-normalized, so with gains of 0.05 every logit is ~0, softmax rows
    are near-uniform and a sparse mask would change little; a gain of 1 (RMSNorm's initial value) gives
    attention some contrast. Returns the model in eval mode."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if gains and name.endswith(tuple(gains)):
                p.copy_(gain * (1 + 0.1 * torch.randn(p.shape, generator=rng)))
            else:
                p.copy_(torch.randn(p.shape, generator=rng) * scale)
    return model.eval()
