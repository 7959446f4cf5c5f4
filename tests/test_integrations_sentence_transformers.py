"""The sentence-transformers losses against sentence-transformers' own, on a tiny SentenceTransformer built locally
(a random 1-layer BertModel and a word-level tokenizer written to a temporary folder, plus mean pooling; no hub):
loss and every parameter gradient within the tolerance table, and a SentenceTransformerTrainer run whose loss
curve matches the upstream loss's.

Truth: the upstream loss on the model in float64. Torch in the same dtype: the upstream loss in float32.
"""
import copy

import pytest
import torch

st = pytest.importorskip("sentence_transformers")

from sentence_transformers.base.modules.transformer import Transformer  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402
from sentence_transformers.sentence_transformer.modules.pooling import Pooling  # noqa: E402
from sentence_transformers.util import cos_sim, dot_score, manhattan_sim  # noqa: E402

from karma_kernels.integrations.sentence_transformers import (  # noqa: E402
    MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss)
from tolerances import assert_close_to_truth  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]
BATCH = 5


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS))
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.5)
    BertModel(config).save_pretrained(str(folder))
    transformer = Transformer(str(folder), max_seq_length=16)
    model = st.SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
                                   device="cpu")
    return model.train()


def _texts(seed, count=BATCH):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (count,), generator=generator).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=generator).tolist())
            for n in lengths]


def _features(model, columns):
    return [model.preprocess(_texts(100 + c)) for c in range(columns)]


def _loss_and_grads(loss_module, model, features):
    model.zero_grad(set_to_none=True)
    loss = loss_module(copy.deepcopy(features), None)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _upstream(model, symmetric, **options):
    if symmetric:
        return st_losses.MultipleNegativesRankingLoss(model, directions=("query_to_doc", "doc_to_query"),
                                                      partition_mode="per_direction", **options)
    return st_losses.MultipleNegativesRankingLoss(model, **options)


CASES = {
    "pairs": dict(columns=2, symmetric=False, options={}),
    "hard_negatives": dict(columns=4, symmetric=False, options={}),
    "dot_score": dict(columns=3, symmetric=False, options=dict(scale=1.0, similarity_fct=dot_score)),
    "symmetric_pairs": dict(columns=2, symmetric=True, options=dict(scale=10.0)),
    "symmetric_hard_negatives": dict(columns=3, symmetric=True, options={}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_sentence_transformers(torch_one_thread, tiny_model, case):
    spec = CASES[case]
    features = _features(tiny_model, spec["columns"])
    model64 = copy.deepcopy(tiny_model).double()
    truth_loss, truth_grads = _loss_and_grads(_upstream(model64, spec["symmetric"], **spec["options"]), model64,
                                              features)
    model = copy.deepcopy(tiny_model)
    torch_loss, torch_grads = _loss_and_grads(_upstream(model, spec["symmetric"], **spec["options"]), model,
                                              features)
    ours_cls = MultipleNegativesSymmetricRankingLoss if spec["symmetric"] else MultipleNegativesRankingLoss
    ours_module = ours_cls(model, **spec["options"])
    assert ours_module.symmetric == spec["symmetric"]
    our_loss, our_grads = _loss_and_grads(ours_module, model, features)
    assert_close_to_truth(f"{case} loss", our_loss, truth_loss, torch_loss, torch.float32)
    assert set(our_grads) == set(truth_grads) and len(our_grads) > 10
    for name, truth in truth_grads.items():
        if truth is None:  # e.g. BERT's pooler, unused by mean pooling
            assert our_grads[name] is None, f"{case}: {name} got a gradient the upstream loss does not give"
            continue
        assert our_grads[name] is not None, f"{case}: {name} received no gradient"
        assert_close_to_truth(f"{case} d{name}", our_grads[name], truth, torch_grads[name], torch.float32)


def test_constructor_matches_upstream_and_refuses_what_it_cannot_compute(tiny_model):
    ours = MultipleNegativesRankingLoss(tiny_model, scale=30.0)
    assert isinstance(ours, st_losses.MultipleNegativesRankingLoss)
    assert ours.get_config_dict() == st_losses.MultipleNegativesRankingLoss(tiny_model, scale=30.0).get_config_dict()
    symmetric = MultipleNegativesRankingLoss(tiny_model, directions=("doc_to_query", "query_to_doc"),
                                             partition_mode="per_direction")
    assert symmetric.symmetric
    with pytest.raises(ValueError, match="similarity_fct"):
        MultipleNegativesRankingLoss(tiny_model, similarity_fct=manhattan_sim)
    with pytest.raises(ValueError, match="directions"):
        MultipleNegativesRankingLoss(tiny_model, directions=("query_to_doc", "query_to_query"))
    with pytest.raises(ValueError, match="directions"):  # joint softmax over both directions: not this loss
        MultipleNegativesRankingLoss(tiny_model, directions=("query_to_doc", "doc_to_query"))
    with pytest.raises(ValueError, match="hardness_mode"):
        MultipleNegativesRankingLoss(tiny_model, hardness_mode="hard_negatives", hardness_strength=5.0)
    with pytest.raises(ValueError, match="at least 2 columns"):
        ours(_features(tiny_model, 1), None)


def _train(tiny_model, tmp_path, loss_cls, **loss_kwargs):
    from datasets import Dataset

    model = copy.deepcopy(tiny_model)
    dataset = Dataset.from_dict({"anchor": _texts(1, 12), "positive": _texts(2, 12), "negative": _texts(3, 12)})
    args = st.SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / loss_cls.__module__.replace(".", "_")), use_cpu=True, max_steps=3,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True,
        lr_scheduler_type="constant")
    trainer = st.SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                            loss=loss_cls(model, **loss_kwargs))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_sentence_transformer_trainer_gives_the_same_loss_curve(torch_one_thread, tiny_model, tmp_path):
    pytest.importorskip("datasets")
    theirs = _train(tiny_model, tmp_path, st_losses.MultipleNegativesRankingLoss)
    ours = _train(tiny_model, tmp_path, MultipleNegativesRankingLoss)
    assert len(ours) == len(theirs) == 3
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=0)


# ------------------------------------------------------------------ gather_across_devices on 2 real gloo ranks

WORLD = 2
GATHER_CASES = {"pairs": (2, False), "hard_negatives": (3, False), "symmetric_pairs": (2, True),
                "symmetric_hard_negatives": (3, True)}


def _rank_embeddings(rank, columns):
    generator = torch.Generator().manual_seed(50 + rank)
    return [torch.randn(BATCH, 8, generator=generator, dtype=torch.float64).requires_grad_(True)
            for _ in range(columns)]


def _gather_worker(rank, port, out_dir):
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    for case, (columns, symmetric) in GATHER_CASES.items():
        for name, module in (("upstream", _upstream(None, symmetric, gather_across_devices=True)),
                             ("ours", (MultipleNegativesSymmetricRankingLoss if symmetric else
                                       MultipleNegativesRankingLoss)(None, gather_across_devices=True))):
            embeddings = _rank_embeddings(rank, columns)
            loss = module.compute_loss_from_embeddings(embeddings, None)
            loss.backward()
            results[(case, name)] = (loss.detach(), [e.grad for e in embeddings])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_gather_across_devices_on_two_ranks_matches_sentence_transformers(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for case in GATHER_CASES:
            truth_loss, truth_grads = results[(case, "upstream")]
            our_loss, our_grads = results[(case, "ours")]
            assert_close_to_truth(f"rank {rank} {case} loss", our_loss, truth_loss, truth_loss, torch.float64)
            for column, (ours, truth) in enumerate(zip(our_grads, truth_grads)):
                assert_close_to_truth(f"rank {rank} {case} d column {column}", ours, truth, truth, torch.float64)
