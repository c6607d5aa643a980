"""ViT / DeiT adapter: method.md section 3 properties, patch and pixel maps, interpolation, explicit reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_pelrp
from helpers.builders import IMAGE, PATCH, images, tiny_vision
from hf_pelrp import AttributionInputError, LRPConfig
from hf_pelrp.config import preset

F64 = torch.float64
CONFIGS = {
    "attnlrp": LRPConfig(mode="attnlrp"),
    "cp": LRPConfig(mode="cp"),
    "vit-paper": preset("vit-paper"),
    "attnlrp-nopos": LRPConfig(mode="attnlrp", positional=False),
    "gamma-attnlrp": LRPConfig(mode="attnlrp", gamma_linear=0.25, gamma_conv=1.0),
}


def special_tokens(model) -> int:
    return 2 if model.config.model_type == "deit" else 1


# ---------------------------------------------------------------------------------------------------------
# forward equivalence, model restored


@pytest.mark.parametrize("kind", ["vit", "deit-teacher"])
def test_forward_equivalence_and_model_restored(kind):
    """Every mode and preset: logits inside the context equal the plain model's; the model comes out unchanged."""
    model = tiny_vision(kind)
    x = images()
    with torch.no_grad():
        plain = model(pixel_values=x).logits
    for name, cfg in CONFIGS.items():
        with hf_pelrp.lrp(model, config=cfg):
            inside = model(pixel_values=x.clone().requires_grad_(True)).logits
        assert (inside - plain).abs().max().item() < 1e-5, name
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()), name
        assert model.config._attn_implementation != hf_pelrp.LRP_ATTENTION
        attr = hf_pelrp.attribute(model, pixel_values=x, config=cfg)
        torch.testing.assert_close(attr.target_value, plain.max(-1).values, rtol=0, atol=1e-5)
        with torch.no_grad():
            assert torch.equal(model(pixel_values=x).logits, plain), name
        assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# the leaves and the splits


@pytest.mark.parametrize("kind", ["vit", "deit"])
@pytest.mark.parametrize("name", ["attnlrp", "vit-paper"])
def test_split_completeness_at_the_embedding_sum(kind, name):
    """``R_t + R_p = R_e`` per token, with biases everywhere (the split itself is exact)."""
    model = tiny_vision(kind)
    captured = {}

    def keep(_module, _args, output):
        output.retain_grad()
        captured["e"] = output

    with hf_pelrp.lrp(model, config=CONFIGS[name]) as ctx:
        handle = model.base_model.embeddings.register_forward_hook(keep)
        logits = model(pixel_values=images()).logits
        logits[:, 3].sum().backward()
        maps = ctx.maps()
        handle.remove()
        e = captured["e"]
        r_e = (e * e.grad).sum(-1)
        token_leaf = ctx.store.additive["token"]
        position_leaf = ctx.store.additive["position"]
        torch.testing.assert_close(token_leaf + position_leaf, e.detach(), rtol=0, atol=0)
    torch.testing.assert_close(maps["token"] + maps["position"], r_e, rtol=1e-5, atol=1e-6)
    assert maps["position"].abs().sum() > 0 and maps["token"].abs().sum() > 0
    seq = special_tokens(model) + (IMAGE // PATCH) ** 2
    assert maps["token"].shape == (2, seq) and maps["patch_map"].shape == (2, IMAGE // PATCH, IMAGE // PATCH)


def test_positional_false_keeps_token_relevance_and_absorbs_the_positions():
    """Additive positions do not change the gradient at ``e``: the token map is the same; without position leaves
    the position embedding acts as a bias and its relevance shows up in the gap (bias-free CP: exactly)."""
    model = tiny_vision("vit", bias_free=True)
    without = hf_pelrp.attribute(model, pixel_values=images(), target=1, mode="cp", positional=False)
    with_pos = hf_pelrp.attribute(model, pixel_values=images(), target=1, mode="cp")
    assert torch.equal(without.position, torch.zeros_like(without.token))
    torch.testing.assert_close(without.token, with_pos.token)
    torch.testing.assert_close(without.conservation_gap, with_pos.position.sum(-1), rtol=1e-5, atol=1e-6)
    assert with_pos.position.abs().sum() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# global conservation (bias-free, conservative rules)


@pytest.mark.parametrize("kind", ["vit", "deit", "deit-teacher"])
@pytest.mark.parametrize("name", ["cp", "vit-paper"])
def test_exact_conservation_bias_free(kind, name):
    model = tiny_vision(kind, bias_free=True)
    attr = hf_pelrp.attribute(model, pixel_values=images(), config=CONFIGS[name])
    total = attr.token.sum(-1) + attr.position.sum(-1)
    torch.testing.assert_close(total, attr.target_value, rtol=1e-5, atol=1e-6)
    assert attr.position.abs().sum() > 0
    # pixel and patch maps carry the relevance of the patch tokens, the special tokens keep theirs
    special = special_tokens(model)
    patch_total = attr.relevance[:, special:].sum(-1)
    torch.testing.assert_close(attr.patch_map.sum((1, 2)), patch_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        attr.pixel_map.sum((1, 2)),
        attr.target_value - attr.relevance[:, :special].sum(-1),
        rtol=1e-4,
        atol=1e-5,
    )


def test_attnlrp_gap_is_reported_not_hidden():
    """AttnLRP's softmax rule absorbs relevance: the gap is non-zero and equals logit - sum of the maps."""
    model = tiny_vision("vit", bias_free=True)
    attr = hf_pelrp.attribute(model, pixel_values=images(), mode="attnlrp")
    gap = attr.target_value - attr.relevance.sum(-1)
    torch.testing.assert_close(attr.conservation_gap, gap)
    assert gap.abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------------------
# patch and pixel maps


@pytest.mark.parametrize("gamma_conv", [None, 100.0])
def test_pixel_map_per_patch_equals_patch_map_minus_conv_bias_share(gamma_conv):
    """Per patch: pixel relevance summed over the patch = token + position relevance - the conv bias's share.

    The bias share is read from the same backward pass: under the epsilon rule it is ``b . g`` at the patch
    token; under the Gamma rule (bias-free model) it is 0.
    """
    model = tiny_vision("vit", bias_free=gamma_conv is not None)
    bias = model.vit.embeddings.patch_embeddings.projection.bias
    if gamma_conv is None:
        with torch.no_grad():
            bias.copy_(torch.randn_like(bias))  # a share large enough to be seen
    cfg = LRPConfig(mode="attnlrp", gamma_conv=gamma_conv)
    attr_direct = hf_pelrp.attribute(model, pixel_values=images(), target=2, config=cfg)
    with hf_pelrp.lrp(model, config=cfg) as ctx:
        model(pixel_values=images()).logits[:, 2].sum().backward()
        maps = ctx.maps()
        token_grad = ctx.store.additive["token"].grad[:, 1:]
    grid = IMAGE // PATCH
    bias_share = (token_grad * bias.detach()).sum(-1).view(2, grid, grid)
    if gamma_conv is not None:
        bias_share = torch.zeros_like(bias_share)
    blocks = maps["pixel_map"].view(2, grid, PATCH, grid, PATCH).sum((2, 4))
    torch.testing.assert_close(blocks, maps["patch_map"] - bias_share, rtol=1e-4, atol=1e-6)
    if gamma_conv is None:
        assert bias_share.abs().max() > 0.01 * maps["patch_map"].abs().max()
    # the position part is spread evenly over the patch's pixels
    position = maps["position"][:, 1:].view(2, grid, grid)
    from_tokens = maps["pixel_map"] - (position / PATCH**2).repeat_interleave(PATCH, 1).repeat_interleave(
        PATCH, 2
    )
    torch.testing.assert_close(from_tokens.view(2, grid, PATCH, grid, PATCH).sum((2, 4)), blocks - position)
    # the same maps through attribute()
    torch.testing.assert_close(attr_direct.patch_map, maps["patch_map"])
    torch.testing.assert_close(attr_direct.pixel_map, maps["pixel_map"])
    assert attr_direct.extras.keys() >= {"patch_map", "pixel_map"}
    assert attr_direct[1].pixel_map.shape == (1, IMAGE, IMAGE)


def test_interpolate_pos_encoding_at_another_size():
    model = tiny_vision("vit", bias_free=True)
    x = images(batch=2, size=48)
    with torch.no_grad():
        plain = model(pixel_values=x, interpolate_pos_encoding=True).logits
    attr = hf_pelrp.attribute(model, pixel_values=x, interpolate_pos_encoding=True, mode="cp")
    torch.testing.assert_close(attr.target_value, plain.max(-1).values, rtol=0, atol=1e-5)
    assert attr.token.shape == (2, 1 + 36) and attr.patch_map.shape == (2, 6, 6)
    assert attr.pixel_map.shape == (2, 48, 48)
    torch.testing.assert_close(attr.relevance.sum(-1), attr.target_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        attr.pixel_map.sum((1, 2)), attr.relevance[:, 1:].sum(-1), rtol=1e-4, atol=1e-5
    )
    # the leaf is the interpolated table, not the 4x4 one
    with hf_pelrp.lrp(model, mode="cp") as ctx:
        model(pixel_values=x, interpolate_pos_encoding=True)
        leaf = ctx.store.additive["position"]
        emb = model.vit.embeddings
        expected = emb.interpolate_pos_encoding(leaf, 48, 48).detach().expand(2, -1, -1)
        assert torch.equal(leaf.detach(), expected)


def test_batch_invariance():
    model = tiny_vision("deit")
    x = images(batch=2)
    batch = hf_pelrp.attribute(model, pixel_values=x, target=torch.tensor([1, 4]), mode="attnlrp")
    for row, target in enumerate((1, 4)):
        alone = hf_pelrp.attribute(model, pixel_values=x[row : row + 1], target=target, mode="attnlrp")
        for name in ("token", "position", "patch_map", "pixel_map"):
            torch.testing.assert_close(
                getattr(batch, name)[row : row + 1], getattr(alone, name), rtol=1e-5, atol=1e-6
            )


def test_deit_distillation_token_is_a_special_token():
    model = tiny_vision("deit-teacher")
    attr = hf_pelrp.attribute(model, pixel_values=images(), mode="cp")
    assert attr.token.shape == (2, 2 + 16)
    # the teacher model's logits average its two heads; both special tokens carry relevance
    assert (attr.relevance[:, :2].abs() > 0).all()
    with torch.no_grad():
        out = model(pixel_values=images())
    torch.testing.assert_close(attr.target_value, out.logits.max(-1).values)


# ---------------------------------------------------------------------------------------------------------
# fast path vs the explicit rules


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def _lrp_dense(x, weight, bias, r_out, gamma=None):
    """Epsilon (gamma None) or generalised Gamma rule of ``z = x W^T + b``, term by term: x [N, I], W [O, I]."""
    g = 0.0 if gamma is None else gamma
    z = x[:, :, None] * weight.T[None]
    z_out = z.sum(1) + bias
    positive = z_out > 0
    z_sel = torch.where(positive[:, None, :], z.clamp(min=0), z.clamp(max=0))
    b_sel = torch.where(positive, bias.clamp(min=0), bias.clamp(max=0))
    share = _safe_div(r_out, z_out + g * (z_sel.sum(1) + b_sel))
    return ((z + g * z_sel) * share[:, None, :]).sum(2)


def _layer_norm(x, ln):
    centred = x - x.mean(-1, keepdim=True)
    scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + ln.eps)
    w, b = ln.weight.detach().to(F64), ln.bias.detach().to(F64)
    return centred * scale * w + b, scale


def _lrp_layer_norm(x, y, scale, ln, r_y):
    """Identity rule: the scale is constant, so LN is the linear map ``y_d = sum_d' x_d' (1[d=d'] - 1/D) s w_d + b_d``.

    Epsilon rule over its terms: ``R_x_d' = x_d' sum_d (1[d=d'] - 1/D) s w_d R_y_d / y_d``.
    """
    v = _safe_div(r_y, y) * ln.weight.detach().to(F64) * scale
    return x * (v - v.mean(-1, keepdim=True))


def _split(a, total, r_total):
    """Epsilon rule at a sum ``total = a + ...``: the share of ``a``."""
    return a * _safe_div(r_total, total)


def reference_vit(model, pixels, target, cfg: LRPConfig):
    """Explicit PE-LRP of a ViT classifier (float64, per image): token, position, pixel-from-token maps.

    Rules: epsilon on attention projections; ``cfg.gamma_linear`` (or epsilon) on the MLP and head linears,
    ``cfg.gamma_conv`` on the patch convolution; identity on LayerNorm and GELU; AttnLRP (uniform rule at
    ``A v`` and ``q k^T``, softmax rule ``R_S = S (R_A - A sum_j R_A)``) or CP (``A`` constant); epsilon at
    every sum (residuals, ``e = t + p``).
    """
    p64 = {k: v.detach().to(F64) for k, v in model.named_parameters()}
    vit = model.vit
    n_heads, hidden = model.config.num_attention_heads, model.config.hidden_size
    hd = hidden // n_heads
    attnlrp = cfg.mode == "attnlrp"
    out_token, out_pos, out_pix = [], [], []
    for b in range(pixels.shape[0]):
        x = pixels[b : b + 1].to(F64)
        cols = F.unfold(x, PATCH, stride=PATCH)[0].T  # [N, C*p*p]
        w_conv = p64["vit.embeddings.patch_embeddings.projection.weight"].flatten(1)
        b_conv = p64["vit.embeddings.patch_embeddings.projection.bias"]
        patches = cols @ w_conv.T + b_conv
        t = torch.cat([p64["vit.embeddings.cls_token"][0], patches])
        pos = p64["vit.embeddings.position_embeddings"][0]
        e = t + pos
        acts = []
        h = e
        for i, layer in enumerate(vit.layers):
            pre = f"vit.layers.{i}."
            n1, s1 = _layer_norm(h, layer.layernorm_before)
            q = (n1 @ p64[pre + "attention.q_proj.weight"].T + p64[pre + "attention.q_proj.bias"]).view(
                -1, n_heads, hd
            )
            k = (n1 @ p64[pre + "attention.k_proj.weight"].T + p64[pre + "attention.k_proj.bias"]).view(
                -1, n_heads, hd
            )
            v = (n1 @ p64[pre + "attention.v_proj.weight"].T + p64[pre + "attention.v_proj.bias"]).view(
                -1, n_heads, hd
            )
            q, k, v = (z.transpose(0, 1) for z in (q, k, v))  # [H, S, hd]
            scores = hd**-0.5 * q @ k.transpose(1, 2)
            probs = scores.softmax(-1)
            o = probs @ v
            o_flat = o.transpose(0, 1).reshape(-1, hidden)
            attn = o_flat @ p64[pre + "attention.o_proj.weight"].T + p64[pre + "attention.o_proj.bias"]
            a1 = h + attn
            n2, s2 = _layer_norm(a1, layer.layernorm_after)
            f1 = n2 @ p64[pre + "mlp.fc1.weight"].T + p64[pre + "mlp.fc1.bias"]
            g = F.gelu(f1)
            f2 = g @ p64[pre + "mlp.fc2.weight"].T + p64[pre + "mlp.fc2.bias"]
            a2 = a1 + f2
            acts.append(
                dict(
                    h=h,
                    n1=n1,
                    s1=s1,
                    q=q,
                    k=k,
                    v=v,
                    S=scores,
                    A=probs,
                    o=o,
                    o_flat=o_flat,
                    attn=attn,
                    a1=a1,
                    n2=n2,
                    s2=s2,
                    f1=f1,
                    g=g,
                    f2=f2,
                    a2=a2,
                )
            )
            h = a2
        final, s_f = _layer_norm(h, vit.layernorm)
        w_head, b_head = (
            p64["classifier.weight"][target[b] : target[b] + 1],
            p64["classifier.bias"][target[b]],
        )
        logit = final[0] @ w_head[0] + b_head
        # backward sweep
        r_final = torch.zeros_like(final)
        r_final[0] = _lrp_dense(final[:1], w_head, b_head[None], logit.view(1, 1), cfg.gamma_linear)[0]
        r_h = _lrp_layer_norm(h, final, s_f, vit.layernorm, r_final)
        for i in reversed(range(len(vit.layers))):
            a, layer, pre = acts[i], vit.layers[i], f"vit.layers.{i}."
            r_a1 = _split(a["a1"], a["a2"], r_h)
            r_f2 = _split(a["f2"], a["a2"], r_h)
            r_g = _lrp_dense(
                a["g"], p64[pre + "mlp.fc2.weight"], p64[pre + "mlp.fc2.bias"], r_f2, cfg.gamma_linear
            )
            r_n2 = _lrp_dense(
                a["n2"], p64[pre + "mlp.fc1.weight"], p64[pre + "mlp.fc1.bias"], r_g, cfg.gamma_linear
            )
            r_a1 = r_a1 + _lrp_layer_norm(a["a1"], a["n2"], a["s2"], layer.layernorm_after, r_n2)
            r_hin = _split(a["h"], a["a1"], r_a1)
            r_attn = _split(a["attn"], a["a1"], r_a1)
            r_o = _lrp_dense(
                a["o_flat"], p64[pre + "attention.o_proj.weight"], p64[pre + "attention.o_proj.bias"], r_attn
            )
            r_o = r_o.view(-1, n_heads, hd).transpose(0, 1)
            # o[h, i, d] = sum_j A[h, i, j] v[h, j, d]: each term's share of R_o
            frac = a["A"][..., None] * a["v"][:, None] * _safe_div(r_o, a["o"])[:, :, None, :]
            r_v = (0.5 if attnlrp else 1.0) * frac.sum(1)
            r_q = torch.zeros_like(a["q"])
            r_k = torch.zeros_like(a["k"])
            if attnlrp:
                r_probs = 0.5 * frac.sum(-1)
                r_s = a["S"] * (r_probs - a["A"] * r_probs.sum(-1, keepdim=True))
                terms = (
                    hd**-0.5
                    * a["q"][:, :, None, :]
                    * a["k"][:, None, :, :]
                    * _safe_div(r_s, a["S"])[..., None]
                )
                r_q, r_k = 0.5 * terms.sum(2), 0.5 * terms.sum(1)
            flat = lambda r: r.transpose(0, 1).reshape(-1, hidden)  # noqa: E731
            r_n1 = sum(
                _lrp_dense(
                    a["n1"],
                    p64[pre + f"attention.{n}_proj.weight"],
                    p64[pre + f"attention.{n}_proj.bias"],
                    flat(r),
                )
                for n, r in (("q", r_q), ("k", r_k), ("v", r_v))
            )
            r_h = r_hin + _lrp_layer_norm(a["h"], a["n1"], a["s1"], layer.layernorm_before, r_n1)
        r_t, r_p = _split(t, e, r_h), _split(pos, e, r_h)
        r_cols = _lrp_dense(cols, w_conv, b_conv, r_t[1:], cfg.gamma_conv)
        r_pix = F.fold(r_cols.T[None], (IMAGE, IMAGE), PATCH, stride=PATCH)[0].sum(0)
        out_token.append(r_t.sum(-1))
        out_pos.append(r_p.sum(-1))
        out_pix.append(r_pix)
    return torch.stack(out_token), torch.stack(out_pos), torch.stack(out_pix)


@pytest.mark.parametrize("name", ["attnlrp", "cp", "vit-paper", "gamma-attnlrp"])
def test_fast_path_matches_explicit_reference(name):
    model = tiny_vision("vit", num_layers=1)
    x = images()
    cfg = CONFIGS[name]
    attr = hf_pelrp.attribute(model, pixel_values=x, target=torch.tensor([0, 3]), config=cfg)
    token, position, pixels = reference_vit(model, x, [0, 3], cfg)
    scale = attr.target_value.abs().max().item()
    tol = dict(rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(attr.token.double(), token, **tol)
    torch.testing.assert_close(attr.position.double(), position, **tol)
    grid = IMAGE // PATCH
    spread = (
        (position[:, 1:].view(2, grid, grid) / PATCH**2)
        .repeat_interleave(PATCH, 1)
        .repeat_interleave(PATCH, 2)
    )
    torch.testing.assert_close(attr.pixel_map.double(), pixels + spread, **tol)


# ---------------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_have_clear_errors():
    model = tiny_vision("vit", num_layers=1)
    with pytest.raises(AttributionInputError, match=r"48x48 but .* 32x32.*interpolate_pos_encoding=True"):
        hf_pelrp.attribute(model, pixel_values=images(size=48))
    with pytest.raises(AttributionInputError, match="1 channel.*expects 3"):
        hf_pelrp.attribute(model, pixel_values=images(channels=1))
    for shape in [(32, 32), (1, 1, 3, 32, 32)]:
        with pytest.raises(AttributionInputError, match=r"\[batch, channels, height, width\]"):
            hf_pelrp.attribute(model, pixel_values=torch.randn(shape))
    with pytest.raises(AttributionInputError, match="pass pixel_values"):
        hf_pelrp.attribute(model, torch.randint(0, 10, (1, 5)))
    with pytest.raises(AttributionInputError, match="no input"):
        hf_pelrp.attribute(model)
    with pytest.raises(AttributionInputError, match="floating-point"):
        hf_pelrp.attribute(model, pixel_values=torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(AttributionInputError, match="NaN"):
        hf_pelrp.attribute(model, pixel_values=torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(AttributionInputError, match="smaller than one 8x8 patch"):
        hf_pelrp.attribute(model, pixel_values=torch.randn(1, 3, 4, 4), interpolate_pos_encoding=True)
    with pytest.raises(AttributionInputError, match="attention_mask"):
        hf_pelrp.attribute(model, pixel_values=images(), attention_mask=torch.ones(2, 17))
    with pytest.raises(AttributionInputError, match="position="):
        hf_pelrp.attribute(model, pixel_values=images(), position=3)
    # a single [C, H, W] image is one row
    assert hf_pelrp.attribute(model, pixel_values=images(batch=1)[0]).token.shape == (1, 17)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_preset_name_through_the_public_api_and_gamma_changes_maps():
    model = tiny_vision("vit", num_layers=1)
    by_mode = hf_pelrp.attribute(model, pixel_values=images(), mode="vit-paper")
    by_config = hf_pelrp.attribute(model, pixel_values=images(), config="vit-paper")
    plain_cp = hf_pelrp.attribute(model, pixel_values=images(), mode="cp")
    torch.testing.assert_close(by_mode.pixel_map, by_config.pixel_map)
    assert by_mode.mode == "cp"
    # the Gamma parameters in effect travel with the result, through slicing and a saved file
    assert by_mode.gamma == {"gamma_linear": 0.05, "gamma_conv": 100.0} and plain_cp.gamma == {}
    assert by_mode[1].gamma == by_mode.gamma and "gamma=" in repr(by_mode)
    assert (by_mode.pixel_map - plain_cp.pixel_map).abs().max() > 0.05 * plain_cp.pixel_map.abs().max()


def test_unsupported_vision_layout_is_refused():
    model = tiny_vision("vit", num_layers=1)
    model.vit.layers[0].mlp.activation_fn = nn.Sigmoid()
    with pytest.raises(hf_pelrp.UnsupportedModelError, match="Sigmoid"):
        hf_pelrp.attribute(model, pixel_values=images())
