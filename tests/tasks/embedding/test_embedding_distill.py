"""`qtune train embedding` loss options: --distill (teacher scores from the data), --symmetric and
--improved-contrastive, from the batch layout to the CLI, GradCache included."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from embedding_cases import assert_gradcache_matches_plain

from qtune.data.retrieval import write_query_groups
from qtune.losses import distillation_kl, improved_contrastive, info_nce, symmetric_info_nce
from qtune.modeling.loading import LoraSettings
from qtune.records import QueryGroup
from qtune.tasks import load_model
from qtune.tasks.embedding import encode, loss as contrastive
from qtune.tasks.embedding.model import Embedder

from support import (ANIMALS, MISSING_MODEL, VEHICLES, assert_refused_before_the_model_loads, assert_user_error,
                     run, train_losses)

TEACHER = (1.0, 0.5, 0.25)  # the positive's score, then the two negatives'


def _groups(teacher=True) -> list[QueryGroup]:
    """8 groups, every text distinct (so a batch of 4 is always full), 2 negatives each."""
    groups = []
    for i, (animal, vehicle) in enumerate(zip(ANIMALS, VEHICLES)):
        others = (f"old {VEHICLES[(i + 1) % 8]}", f"a big {VEHICLES[(i + 2) % 8]}")
        group = QueryGroup(f"my {animal}", (f"the {vehicle} is here",), others, line=i + 1)
        groups.append(replace(group, pos_scores=TEACHER[:1], neg_scores=TEACHER[1:]) if teacher else group)
    return groups


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _teacher_kl(folder, teacher_temperature: float) -> float:
    """KL(teacher || model) over the training groups, the model loaded from `folder` for inference."""
    import qtune

    embedder = qtune.load(str(folder), task="embedding", device="cpu")
    groups = _groups()
    queries = torch.from_numpy(embedder.embed([g.query for g in groups], is_query=True))  # (8, dim)
    candidates = [torch.from_numpy(embedder.embed([g.positives[0], *g.negatives])) for g in groups]  # 8 x (3, dim)
    student = torch.stack([c @ q for q, c in zip(queries, candidates)])  # (8, 3)
    return distillation_kl(student, torch.tensor([TEACHER] * len(groups)), 0.05, teacher_temperature).item()


@pytest.fixture
def kl_spy(monkeypatch) -> list[dict]:
    """Every call of `distillation_kl` the embedding loss makes: its inputs and value."""
    calls = []

    def spy(student, teacher, temperature, teacher_temperature, padding):
        value = distillation_kl(student, teacher, temperature, teacher_temperature, padding)
        calls.append({"teacher": teacher.cpu().clone(), "padding": padding.cpu().clone(), "temperature": temperature,
                      "teacher_temperature": teacher_temperature, "value": float(value.detach())})
        return value

    monkeypatch.setattr(contrastive, "distillation_kl", spy)
    return calls


def test_loss_inputs_point_at_each_groups_own_candidates():
    features = [{"negatives": [{}, {}], "teacher": [3.0, 2.0, 1.0]}, {"negatives": [{}], "teacher": [5.0, 4.0]}]
    # collate lays candidates out as: positive 0, positive 1, negatives of group 0 (2, 3), of group 1 (4)
    inputs = contrastive.loss_inputs(features)
    assert inputs[contrastive.CANDIDATE_OWNER].tolist() == [0, 1, 0, 0, 1]
    assert inputs[contrastive.TEACHER_INDEX].tolist() == [[0, 2, 3], [1, 4, 0]]
    assert inputs[contrastive.TEACHER_PADDING].tolist() == [[False, False, False], [False, False, True]]
    assert inputs[contrastive.TEACHER_SCORES].tolist() == [[3.0, 2.0, 1.0], [5.0, 4.0, 0.0]]
    # without teacher scores: the owners only
    assert set(contrastive.loss_inputs([{"negatives": []}])) == {contrastive.CANDIDATE_OWNER}


def _vectors_and_batch():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(2, 8, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    features = [{"negatives": [{}, {}], "teacher": [3.0, 2.0, 1.0]}, {"negatives": [{}], "teacher": [5.0, 4.0]}]
    return q, p, contrastive.loss_inputs(features)


def test_the_loss_is_the_chosen_contrastive_term_plus_weight_times_kl():
    q, p, batch = _vectors_and_batch()
    similarity = q @ p.T
    # the student's group scores, picked by hand: group 0 -> candidates 0, 2, 3; group 1 -> 1, 4 (and padding)
    student = torch.stack([similarity[0, [0, 2, 3]], torch.cat([similarity[1, [1, 4]], similarity[1, :1]])])
    kl = distillation_kl(student, batch[contrastive.TEACHER_SCORES], 0.05, 2.0, batch[contrastive.TEACHER_PADDING])
    owner = batch[contrastive.CANDIDATE_OWNER]
    cases = {
        (False, False, False): info_nce(q, p, 0.05) + 0.5 * kl,
        (True, False, False): symmetric_info_nce(q, p, 0.05) + 0.5 * kl,
        (False, True, False): improved_contrastive(q, p, 0.05, candidate_owner=owner) + 0.5 * kl,
        (False, False, True): 0.5 * kl,
    }
    for (symmetric, improved, only), expected in cases.items():
        settings = contrastive.ContrastiveSettings(pooling="cls", temperature=0.05, symmetric=symmetric,
                                                   improved_contrastive=improved, distill_weight=0.5,
                                                   distill_only=only, distill_temperature=2.0)
        value = contrastive._loss_from_vectors(q, p, settings, batch)
        assert value.item() == pytest.approx(expected.item(), rel=1e-10), (symmetric, improved, only)
    plain = contrastive.ContrastiveSettings(pooling="cls", temperature=0.05)
    assert contrastive._loss_from_vectors(q, p, plain, batch).item() == pytest.approx(info_nce(q, p).item())


def test_gradcache_gives_the_plain_gradients_with_distillation_and_the_improved_loss(tiny_bert_dir):
    loaded = load_model(tiny_bert_dir, task="embedding", device="cpu", trainable=True,
                        lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    loaded.model.eval()  # no dropout: both paths see the same network
    features = contrastive.with_teacher_scores(
        encode.group_features(_groups(), Embedder(loaded).features, hard_negatives=2),
        [(g.pos_scores, g.neg_scores) for g in _groups()])
    batch = contrastive.collate_for_loss(lambda f: encode.collate(loaded.tokenizer, f), features[:5])
    settings = contrastive.ContrastiveSettings(pooling=loaded.meta.settings.pooling, temperature=0.05, mini_batch_size=3,
                                               matryoshka_dims=(16,), improved_contrastive=True,
                                               false_negative_offset=0.1, distill_weight=2.0, distill_temperature=0.1)
    assert_gradcache_matches_plain(loaded.model, batch, settings)


FLAGS = ["--full", "--lr", "5e-3", "--epochs", "3", "--min-steps", "0", "--batch-size", "4", "--hard-negatives", "2",
         "--max-length", "16", "--logging-steps", "1", "--device", "cpu", "--seed", "1"]


@pytest.mark.parametrize("cached", [False, True])
def test_distill_only_trains_on_the_teachers_scores(cached, still_bert_dir, tmp_path, capsys, kl_spy):
    train = tmp_path / "train.jsonl"
    write_query_groups(train, _groups())
    out = tmp_path / "out"
    extra = ["--cached", "--mini-batch-size", "3"] if cached else []
    code, _, err = run(capsys, "train", "embedding", "--model", still_bert_dir, "--train", train, "--output", out,
                       "--distill", "--distill-only", "--distill-weight", "2", "--distill-temperature", "0.1",
                       *FLAGS, *extra)
    assert code == 0, err
    losses = train_losses(out)
    assert len(losses) == 6 and len(kl_spy) == 6 and all(math.isfinite(v) for v in losses)
    # what the trainer minimised is 2 x the KL, nothing else
    assert losses == pytest.approx([2 * c["value"] for c in kl_spy], abs=1e-5)
    for call in kl_spy:  # every group's teacher row reached the loss, with both temperatures
        assert call["teacher"].tolist() == [list(TEACHER)] * 4 and not call["padding"].any()
        assert (call["temperature"], call["teacher_temperature"]) == (0.05, 0.1)
    # the trained model (measured on a 2-core CPU: KL 1.05 -> 0.87 in these 6 steps) is nearer the teacher
    assert _teacher_kl(out / "last", 0.1) < _teacher_kl(still_bert_dir, 0.1) - 0.05


def test_symmetric_and_improved_runs_reach_their_loss(tiny_bert_dir, tmp_path, capsys, monkeypatch):
    train = tmp_path / "train.jsonl"
    write_query_groups(train, _groups(teacher=False))
    seen = []
    for name in ("symmetric_info_nce", "improved_contrastive"):
        original = getattr(contrastive, name)
        monkeypatch.setattr(contrastive, name, lambda *a, _f=original, _n=name, **k: seen.append(_n) or _f(*a, **k))
    for flag, loss_name in (("--symmetric", "symmetric_info_nce"), ("--improved-contrastive", "improved_contrastive")):
        out = tmp_path / loss_name
        seen.clear()
        code, _, err = run(capsys, "train", "embedding", "--model", tiny_bert_dir, "--train", train, "--output", out,
                           flag, *FLAGS)
        assert code == 0, err
        assert seen == [loss_name] * 6  # one call per batch: 2 batches x 3 epochs
        assert all(math.isfinite(v) for v in train_losses(out))


def test_distill_without_teacher_scores_names_the_first_line_without_them(tmp_path, capsys):
    groups = _groups()
    groups[2] = replace(groups[2], pos_scores=None, neg_scores=None)
    train = tmp_path / "train.jsonl"
    write_query_groups(train, groups)
    assert_refused_before_the_model_loads(capsys, "embedding", ["--train", train, "--distill", "--hard-negatives", "1"],
                                          tmp_path / "out", f"{train}:3", "pos_scores", "qtune mine --rescore-with")
    # the same file trains without --distill as far as the (missing) model
    code, _, err = run(capsys, "train", "embedding", "--model", MISSING_MODEL, "--train", train, "--output",
                       tmp_path / "plain", "--device", "cpu")
    assert_user_error(code, err, MISSING_MODEL)


@pytest.mark.parametrize("flags, message", [
    (["--symmetric", "--improved-contrastive"], "--symmetric and --improved-contrastive overlap"),
    (["--distill-only"], "--distill-only needs --distill"),
    (["--distill", "--distill-only", "--symmetric", "--hard-negatives", "1"], "would do nothing"),
    (["--distill", "--hard-negatives", "0"], "--distill with --hard-negatives 0"),
    (["--distill"], "--distill with --hard-negatives 0 (the default) has nothing to learn"),
])
def test_contradicting_loss_flags_are_refused_before_anything_runs(flags, message, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    write_query_groups(train, _groups())
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", "embedding", "--model", MISSING_MODEL, "--train", train, "--output", out,
                       "--device", "cpu", *flags)
    assert_user_error(code, err, message)
    assert MISSING_MODEL not in err and not out.exists()


def test_written_groups_keep_their_teacher_scores(tmp_path):
    train = tmp_path / "train.jsonl"
    write_query_groups(train, _groups()[:1])
    line = json.loads(train.read_text(encoding="utf-8"))
    assert (line["pos_scores"], line["neg_scores"]) == ([1.0], [0.5, 0.25])
