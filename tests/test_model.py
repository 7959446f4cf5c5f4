"""karma.model / losses / train / evaluate on tiny configs: each objective learns, h is what it should be,
retrieval equals brute force, checkpoints resume exactly, bad configs name the field."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from karma.data import ConfigError  # noqa: E402
from karma.evaluate import (attention_sink_ratio, decodability_probe, evaluate, impression_auc,  # noqa: E402
                            interest_embeddings, ranking_metrics, retrieve)
from karma.losses import (ObjectiveConfig, action_loss, decode_text_loss, karma_losses,  # noqa: E402
                          language_model_loss)
from karma.model import ModelConfig, history_tensors, make_batch  # noqa: E402
from karma.train import (ExperimentConfig, build_workspace, load_checkpoint, save_checkpoint,  # noqa: E402
                         text_length, train)

TINY = ExperimentConfig.tiny()


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def workspace():
    return build_workspace(TINY.replace(objectives={"backend": "torch"}))


def fresh(objectives=None, **sections):
    config = TINY.replace(objectives={"backend": "torch", **(objectives or {})}, **sections)
    return build_workspace(config)


@pytest.mark.parametrize("objective", ["action", "generation", "reconstruction", "image"])
def test_each_objective_decreases(objective):
    weights = {name: 0.0 for name in ("action", "generation", "reconstruction", "image")}
    weights[objective] = 1.0
    ws = fresh(weights)
    batch = make_batch(ws.split.train, np.arange(16))
    optimizer = torch.optim.AdamW(ws.model.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        generator = torch.Generator().manual_seed(0)  # same flow-matching noise each step: a fixed objective
        loss = karma_losses(ws.model, batch, ws.config.objectives, generator)[objective]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_language_model_loss_through_the_hf_patch_equals_the_direct_path(workspace):
    """Pretraining's LM loss runs the backbone's own forward patched by karma_kernels.integrations.transformers;
    it equals the loss decoded from the decoder's states directly (values and gradients), and leaves the backbone
    unpatched."""
    from karma_kernels.integrations.transformers import is_patched

    model, bos_id = workspace.model, workspace.tokenizer.bos_id
    text_ids = model.item_tokens[:6].clone()
    text_ids[:3, -2:] = model.pad_id             # shorter texts: padding is ignored on both paths
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    direct = decode_text_loss(model, model.text_states(text_ids, bos_id), text_ids, "torch")
    direct_grads = torch.autograd.grad(direct, params, allow_unused=True)
    patched = language_model_loss(model, text_ids, bos_id, "torch")
    patched_grads = torch.autograd.grad(patched, params, allow_unused=True)
    assert not is_patched(model.backbone)
    torch.testing.assert_close(patched, direct, rtol=1e-5, atol=1e-6)
    for got, want in zip(patched_grads, direct_grads):
        if want is None:
            assert got is None or not got.abs().any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_reconstruction_gradient_reaches_h(workspace):
    model = workspace.model
    batch = make_batch(workspace.split.train, np.arange(8))
    objectives = ObjectiveConfig(action=0, generation=0, reconstruction=1, image=0, backend="torch")
    model.zero_grad()
    karma_losses(model, batch, objectives)["reconstruction"].backward()
    assert model.interest_head.weight.grad is not None and model.interest_head.weight.grad.abs().sum() > 0
    assert model.item_to_token.weight.grad.abs().sum() > 0   # and on through h into the history tokens


def test_h_ignores_the_text_after_it_and_the_padding(workspace):
    model = workspace.model.eval()
    item_emb = model.all_item_embeddings()
    history = torch.as_tensor(workspace.split.test.history[:6])
    history_emb, mask = history_tensors(item_emb, history)
    text = model.item_tokens[torch.as_tensor(workspace.split.test.target[:6])]
    with torch.no_grad():
        h_alone, _, _, _ = model.user_forward(history_emb, mask)
        h_with_text, states, prefix_len, _ = model.user_forward(history_emb, mask, text)
        # One user alone, without left padding, gives the same h as in the padded batch.
        row = int(torch.argmin(mask.sum(1)))
        keep = mask[row]
        h_single, _, _, _ = model.user_forward(history_emb[row:row + 1, keep], mask[row:row + 1, keep])
    torch.testing.assert_close(h_with_text, h_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_single[0], h_alone[row], rtol=1e-4, atol=1e-5)
    assert states.shape[1] == prefix_len + text.shape[1] and prefix_len == history.shape[1]
    assert torch.allclose(h_alone.norm(dim=-1), torch.ones(6))
    model.train()


def test_make_batch_indexes_items(workspace):
    windows = workspace.split.train
    rows = np.array([0, 3, 3, 7])
    batch = make_batch(windows, rows, rng=np.random.default_rng(1))
    ids = batch.item_ids.numpy()
    inputs, targets, negatives = windows.inputs_targets(rows)
    index = batch.history_index.numpy()
    np.testing.assert_array_equal(np.where(index >= 0, ids[np.maximum(index, 0)], -1), inputs)
    # one query per position with a target, its key is that target; keys are the distinct targets + negatives
    np.testing.assert_array_equal(batch.query_position.numpy(), np.flatnonzero(targets.reshape(-1) >= 0))
    keys = batch.key_ids.numpy()
    np.testing.assert_array_equal(keys[batch.query_key.numpy()], targets[targets >= 0])
    np.testing.assert_array_equal(keys, np.unique(np.concatenate([targets[targets >= 0], negatives[negatives >= 0]])))
    np.testing.assert_array_equal(ids[batch.key_index.numpy()], keys)
    counts = [(targets == k).sum() + (negatives == k).sum() for k in keys]
    np.testing.assert_allclose(batch.key_logq.numpy(), np.log(np.array(counts) / sum(counts)), rtol=1e-6)
    assert batch.num_queries == (targets >= 0).sum()
    # the sampled position: its prefix (right-aligned) and its target
    for row, flat in enumerate(batch.sample_position.numpy()):
        column = flat - row * inputs.shape[1]
        assert targets[row, column] >= 0 and batch.sample_target_ids[row] == targets[row, column]
        prefix = inputs[row, : column + 1]
        sample = batch.sample_history_index[row].numpy()
        assert ids[sample[sample >= 0]].tolist() == prefix[prefix >= 0].tolist() and sample[-1] >= 0


def test_dense_action_loss_against_a_loop(workspace):
    model = workspace.model
    batch = make_batch(workspace.split.train, np.arange(6))
    objectives = ObjectiveConfig(backend="torch", temperature=0.1)
    with torch.no_grad():
        item_emb = model.item_embeddings(batch.item_ids)
        history_emb, mask = history_tensors(item_emb, batch.history_index)
        _, states, prefix_len, _ = model.user_forward(history_emb, mask)
        h_all = model.interest(states[:, :prefix_len])
        loss = action_loss(h_all, item_emb, batch, objectives)
        inputs, targets, _ = workspace.split.train.inputs_targets(np.arange(6))
        keys = item_emb[batch.key_index]
        total, count = 0.0, 0
        for row in range(inputs.shape[0]):
            for column in range(inputs.shape[1]):
                if targets[row, column] < 0:
                    continue
                # h at a position equals h from the history up to it alone (causal; dense supervision is sound)
                prefix = inputs[row, : column + 1]
                prefix = torch.as_tensor(np.searchsorted(batch.item_ids.numpy(), prefix[prefix >= 0]))[None]
                alone, _ = history_tensors(item_emb, prefix)
                h, _, _, _ = model.user_forward(alone, torch.ones_like(prefix, dtype=torch.bool))
                torch.testing.assert_close(h[0], h_all[row, column], rtol=1e-4, atol=1e-5)
                logits = keys @ h[0] / 0.1 - batch.key_logq
                positive = int(np.searchsorted(batch.key_ids.numpy(), targets[row, column]))
                total += float(torch.logsumexp(logits, 0) - logits[positive])
                count += 1
    assert float(loss) == pytest.approx(total / count, rel=1e-4)
    without = action_loss(h_all, item_emb, batch, ObjectiveConfig(backend="torch", temperature=0.1, logq=False))
    assert float(without) != pytest.approx(float(loss), rel=1e-3)


def test_text_length_from_the_data_warns_with_counts():
    from karma.data import WordTokenizer

    texts = ["a b"] * 95 + ["a b c d e f g h i j k"] * 5 + ["a b c d e f g h i j k l m n o p"]
    tokenizer = WordTokenizer.build(texts)
    with pytest.warns(UserWarning, match="1 of 101 item texts are longer and are cut"):
        assert text_length(tokenizer, texts, None) == 12
    with pytest.warns(UserWarning, match="6 of 101"):
        assert text_length(tokenizer, texts, 4) == 4


@pytest.mark.parametrize("encoder", ["bow", "backbone"])
def test_text_item_tower_is_the_masked_mean_of_token_states(encoder):
    """The bow tower pools with one weighted embedding bag per item; written out here as a gather and a masked
    mean over the non-pad tokens (items with padding and an all-pad item included, gradients too)."""
    ws = fresh(model={"item_encoder": encoder, "use_image": False})
    model = ws.model
    ids = torch.arange(5)
    with torch.no_grad():
        model.item_tokens[0, 2:] = model.pad_id                 # a short text
        model.item_tokens[1] = model.pad_id                     # no text at all: a zero mean
    tokens = model.item_tokens[ids]
    mask = tokens != model.pad_id
    assert mask[2:].all(dim=1).any() and not mask[1].any()
    table = model.backbone.get_input_embeddings().weight
    ours = model.item_embeddings(ids)
    states = table[tokens] if encoder == "bow" else model.run_decoder(table[tokens], mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(states.dtype)
    pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    expected = torch.nn.functional.normalize(model.text_to_item(pooled).float(), dim=-1)
    torch.testing.assert_close(ours, expected)
    grad_ours, = torch.autograd.grad(ours.square().sum() + (ours[:, 0] * 3).sum(), table)
    grad_expected, = torch.autograd.grad(expected.square().sum() + (expected[:, 0] * 3).sum(), table)
    torch.testing.assert_close(grad_ours, grad_expected)


@pytest.mark.parametrize("encoder", ["id", "bow+id"])
def test_id_and_hybrid_item_towers(encoder):
    ws = fresh(model={"item_encoder": encoder, "use_image": False})
    model = ws.model
    ids = torch.arange(6)
    before = model.item_embeddings(ids).detach()
    model.item_tokens[0] = model.item_tokens[1]                # two items whose texts collide
    after = model.item_embeddings(ids).detach()
    if encoder == "id":
        torch.testing.assert_close(before, after)                # the text is not read at all
    else:
        torch.testing.assert_close(after[0], after[1])           # zero-initialised IDs: the text decides first
        with torch.no_grad():
            model.item_id_embedding.weight.normal_()
        assert not torch.allclose(model.item_embeddings(ids[:1]), model.item_embeddings(ids[1:2]))
    losses = karma_losses(model, make_batch(ws.split.train, np.arange(4)), ws.config.objectives)
    assert torch.isfinite(losses["total"])


@pytest.mark.parametrize("num_shards", [1, 3])
def test_retrieval_equals_brute_force(num_shards):
    rng = np.random.default_rng(0)
    items = rng.normal(size=(97, 16)).astype(np.float32)
    queries = rng.normal(size=(11, 16)).astype(np.float32)
    scores, ids = retrieve(items, queries, k=20, num_shards=num_shards)
    brute = torch.topk(torch.as_tensor(queries) @ torch.as_tensor(items).T, 20)
    np.testing.assert_array_equal(ids, brute.indices.numpy())
    np.testing.assert_allclose(scores, brute.values.numpy(), rtol=1e-5, atol=1e-5)


def test_ranking_metrics_and_auc_against_loops():
    rng = np.random.default_rng(1)
    ids = np.stack([rng.permutation(30)[:12] for _ in range(9)])
    target = rng.integers(0, 30, 9)
    metrics = ranking_metrics(ids, target, ks=(1, 5, 12))
    for k in (1, 5, 12):
        hits, gains = [], []
        for row in range(9):
            ranked = list(ids[row, :k])
            hits.append(target[row] in ranked)
            gains.append(1 / np.log2(ranked.index(target[row]) + 2) if target[row] in ranked else 0.0)
        assert metrics[f"HR@{k}"] == pytest.approx(np.mean(hits))
        assert metrics[f"NDCG@{k}"] == pytest.approx(np.mean(gains))

    h = torch.randn(5, 4)
    item_emb = torch.randn(20, 4)
    item_emb[3] = item_emb[4]  # a tie counts half
    target = np.array([0, 1, 2, 3, 5])
    negatives = np.array([[4, 5, -1], [6, 7, 8], [-1, -1, -1], [4, 9, -1], [1, 2, 3]])
    expected = []
    for row in range(5):
        valid = [n for n in negatives[row] if n >= 0]
        if valid:
            pos = float(h[row] @ item_emb[target[row]])
            expected.append(np.mean([1.0 if pos > float(h[row] @ item_emb[n]) else
                                     0.5 if pos == float(h[row] @ item_emb[n]) else 0.0 for n in valid]))
    assert impression_auc(h, item_emb, target, negatives) == pytest.approx(np.mean(expected))
    assert np.isnan(impression_auc(h, item_emb, target, np.full((5, 2), -1)))


def test_attention_sink_ratio_against_a_loop(workspace):
    model = workspace.model.eval()
    item_emb = model.all_item_embeddings()
    history = workspace.split.test.history[:4]
    ratio = attention_sink_ratio(model, item_emb, history)
    history_emb, mask = history_tensors(item_emb, torch.as_tensor(history))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        _, _, _, output = model.user_forward(history_emb, mask, output_attentions=True)
    model.set_attn_implementation("sdpa")
    values = []
    for row in range(4):
        first = int(np.argmax(history[row] >= 0))
        for attention in output.attentions:
            for query in range(first + 1, history.shape[1]):
                values.append(float(attention[row, :, query, first].mean()))
    assert ratio == pytest.approx(np.mean(values), rel=1e-5)
    assert model.backbone.config._attn_implementation == "sdpa"
    model.train()


def test_evaluate_reports_every_metric(workspace):
    metrics = evaluate(workspace.model, workspace.split.test, ks=(10, 50), num_shards=2,
                       probe_examples=workspace.split.train, probe_steps=5, backend="torch")
    for name in ("HR@10", "HR@50", "NDCG@10", "NDCG@50", "AUC", "decodability", "probe_decodability", "sink_ratio",
                 "image_cos"):
        assert np.isfinite(metrics[name]), name
    assert 0 <= metrics["HR@10"] <= metrics["HR@50"] <= 1 and 0 <= metrics["decodability"] <= 1
    h = interest_embeddings(workspace.model, workspace.model.all_item_embeddings(), workspace.split.test.history)
    assert h.shape == (len(workspace.split.test), TINY.model.embed_dim)


def test_protocols_and_slices(workspace):
    from karma.evaluate import drop_seen, seen_items

    split = workspace.split
    kept = evaluate(workspace.model, split.test, ks=(10,), probe_steps=0, train_counts=split.train_counts)
    masked = evaluate(workspace.model, split.test, ks=(10,), probe_steps=0, train_counts=split.train_counts,
                      protocol="masked")
    seen = seen_items(split.test)
    for row, items in enumerate(seen):   # the whole history before the target, not only the last max_history
        user = split.test.user[row]
        assert items.tolist() == workspace.dataset.sequences[user][: split.test.position[row]]
    ranks = np.array(masked["ranks"])
    retargeted = np.array([t in s for t, s in zip(split.test.target, seen)])
    assert (ranks[retargeted] >= 10).all()            # a re-clicked target is removed with the history
    assert kept["slices"]["warm"]["examples"] + kept["slices"]["cold"]["examples"] == len(split.test)
    cold = split.train_counts[split.test.target] <= 2
    hits = np.array(kept["ranks"]) < 10
    assert kept["slices"]["cold"]["HR@10"] == pytest.approx(hits[cold].mean())
    assert drop_seen(np.array([[3, 1, 2, 5]]), [np.array([1, 5])], 3).tolist() == [[3, 2, -1]]
    with pytest.raises(ValueError, match="protocol"):
        evaluate(workspace.model, split.test, protocol="filtered")


def test_decodability_probe_reads_information_in_h(workspace):
    model = workspace.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    codes = torch.nn.functional.normalize(torch.randn(model.item_tokens.shape[0], TINY.model.embed_dim), dim=-1)
    targets = np.random.default_rng(0).integers(0, model.item_tokens.shape[0], 256)
    informed = decodability_probe(model, codes[targets], targets, codes[targets[:64]], targets[:64], steps=60,
                                  backend="torch")
    blind = decodability_probe(model, torch.zeros(256, TINY.model.embed_dim), targets,
                               torch.zeros(64, TINY.model.embed_dim), targets[:64], steps=60, backend="torch")
    assert 0 <= blind < informed <= 1
    for name, param in model.named_parameters():   # the model is left as it was, trainable again
        assert param.requires_grad and torch.equal(param, before[name]), name


def test_resume_continues_exactly(tmp_path):
    steps = {"steps": 4, "pretrain_steps": 0, "log_every": 1, "checkpoint_every": 2}
    straight = fresh(train=steps)
    history = train(straight)

    interrupted = fresh(train={**steps, "steps": 2})
    train(interrupted, run_dir=str(tmp_path))
    resumed = fresh(train=steps)
    resumed_history = train(resumed, run_dir=str(tmp_path), resume=True)
    assert [h["total"] for h in resumed_history] == pytest.approx([h["total"] for h in history], rel=1e-5)
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_trains():
    # The GPU path trains under bf16 autocast; CPU autocast exercises the same dtype plumbing here.
    ws = fresh(train={"precision": "bf16", "steps": 3, "pretrain_steps": 1, "log_every": 1})
    history = train(ws)
    assert all(np.isfinite(h["total"]) for h in history) and len(history) == 3


def test_checkpoint_round_trip_and_mismatch(tmp_path, workspace):
    save_checkpoint(str(tmp_path), workspace.model, None, 3, [])
    other = fresh()
    assert load_checkpoint(str(tmp_path), other.model)["step"] == 3
    for a, b in zip(workspace.model.state_dict().values(), other.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    wider = fresh(model={"embed_dim": 24})
    with pytest.raises(Exception, match="model"):
        load_checkpoint(str(tmp_path), wider.model)


def test_local_backbone_path(tmp_path, workspace):
    workspace.model.backbone.save_pretrained(str(tmp_path / "lm"))
    ws = fresh(model={"backbone_path": str(tmp_path / "lm")})
    torch.testing.assert_close(ws.model.lm_head_weight, workspace.model.lm_head_weight)
    losses = karma_losses(ws.model, make_batch(ws.split.train, np.arange(4)), ws.config.objectives)
    assert torch.isfinite(losses["total"])


@pytest.mark.parametrize("section, values, field", [
    ("model", {"hidden_size": 30, "num_heads": 4}, "model.hidden_size"),
    ("model", {"item_encoder": "cnn"}, "model.item_encoder"),
    ("model", {"hiden_size": 32}, "model.hiden_size"),
    ("objectives", {"action_mode": "listwise"}, "objectives.action_mode"),
    ("objectives", {"generation": -1}, "objectives.generation"),
    ("objectives", {"action": 0, "generation": 0, "reconstruction": 0, "image": 0}, "objectives"),
    ("objectives", {"temperature": 0}, "objectives.temperature"),
    ("train", {"batch_size": 0}, "train.batch_size"),
    ("train", {"epochs": 0}, "train.epochs"),
    ("model", {"dropout": 1.0}, "model.dropout"),
    ("train", {"eval_every": -1}, "train.eval_every"),
    ("objectives", {"logq": "yes"}, "objectives.logq"),
    ("data", {"cold_item_fraction": 1.0}, "data.cold_item_fraction"),
    ("train", {"precision": "fp8"}, "train.precision"),
    ("data", {"source": "csv"}, "data.source"),
    ("data", {"source": "movielens"}, "data.path"),
])
def test_bad_configs_name_the_field(section, values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ExperimentConfig().replace(**{section: values})


def test_unknown_section_and_image_without_images():
    with pytest.raises(ConfigError, match="unknown section 'optim'"):
        ExperimentConfig.from_dict({"optim": {}})
    with pytest.raises(ConfigError, match="model.max_text_len"):
        ModelConfig(max_text_len=1)


def test_flow_matching_noise_is_drawn_on_the_generators_device():
    from karma.model import FlowMatchingHead

    torch.manual_seed(0)
    head = FlowMatchingHead(4, 6, 8)
    condition, target = torch.randn(5, 6), torch.randn(5, 4)
    # the same seeded generator gives the same loss; no generator draws on the target's device
    first = head.loss(condition, target, torch.Generator().manual_seed(3))
    assert torch.equal(first, head.loss(condition, target, torch.Generator().manual_seed(3)))
    assert torch.isfinite(head.loss(condition, target))
    if torch.cuda.is_available():   # the GPU lane: a CUDA generator with CUDA tensors, no draw on the CPU
        head = head.cuda()
        loss = head.loss(condition.cuda(), target.cuda(), torch.Generator(device="cuda").manual_seed(3))
        assert loss.device.type == "cuda" and torch.isfinite(loss)
        sample = head.sample(condition.cuda(), 4, generator=torch.Generator(device="cuda").manual_seed(3))
        assert sample.device.type == "cuda"
