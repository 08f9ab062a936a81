"""`tl rank`: choose the source model before training, by transferability scores (issue 30).

Every candidate backbone embeds the target's labelled TRAINING shots once (the rows `--shots`
and `--seed` pick, as the training core picks them: `sample_shots`), through the same cached
feature path as `linear-probe` (`cached_features`, keyed by the backbone's weights and the
images), so probing the winner afterwards reads the features from the cache. The test split is
never read. On those features:

- LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
  ICML 2021): the log evidence per example of a Bayesian linear model from the features to each
  class's one-vs-rest 0/1 target, alpha and beta (prior and noise precisions) set by the paper's
  fixed-point iteration over the SVD of the features, averaged over the classes. The default
  score: candidates are ranked by it, highest first.
- LEEP (Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of Learned
  Representations", ICML 2020): the log expected empirical prediction through the candidate's
  own source head (softmax of its classifier on the same features); only for candidates trained
  by tl on labels (a checkpoint with its data's classes). A packaged encoder or a bare backbone
  has no source head: its LEEP is None.
- NCE (Tran et al., "Transferability and Hardness of Supervised Classification Tasks", ICCV
  2019): the negative conditional entropy -H(Y | Z) of the target labels Y given the source
  head's argmax labels Z, from their empirical joint over the shots; like LEEP, only through a
  source head (None otherwise).
- H-score (Bao et al., "An Information-Theoretic Approach to Transferability in Task Transfer
  Learning", ICIP 2019): tr(cov(f)^-1 cov(E[f | y])) on the same features, with cov(f) shrunk
  towards a multiple of the identity (Ledoit-Wolf) so that it means something on few shots;
  for every candidate.
Both come from the features and source probabilities LogME and LEEP read (no second pass); they
are reported beside them, and LogME alone orders the ranking.

Candidates by default: every version in the MLflow registry whose architecture reads the
target's kind of input (images with the target's channels, or text), the packaged backbones
that fit (minilm-l6 for text, efficientnet-lite0, -lite1 and -lite2 for 3-channel images), and the pretrain
checkpoints of the work directory (`<workdir>/models/scratch-*` trained on another dataset than
the target); or the URIs given with `--candidates`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from tl_core import storage
from tl_core.errors import UserError

# The fixed point: stop when alpha/beta moves by less than this relatively (the paper's code:
# 1e-2, at most 11 iterations).
LOGME_TOL = 1e-6
LOGME_MAX_ITER = 100


# -- the scores -----------------------------------------------------------------------------------


def _evidence(alpha: float, beta: float, sigma: np.ndarray, D: int, N: int, res2: float, m2: float) -> float:
    """log p(y | F, alpha, beta) of the Bayesian linear model y = F w + noise, w ~ N(0, I/alpha),
    noise ~ N(0, I/beta), at its posterior mean m: `res2` = ||F m - y||^2, `m2` = ||m||^2,
    `sigma` the nonzero eigenvalues of F^T F (the other D - len(sigma) are zero)."""
    logdet = np.log(alpha + beta * sigma).sum() + (D - len(sigma)) * math.log(alpha)
    return (D / 2 * math.log(alpha) + N / 2 * math.log(beta) - 0.5 * logdet - beta / 2 * res2 - alpha / 2 * m2
            - N / 2 * math.log(2 * math.pi))


def logme_class(f: np.ndarray, y: np.ndarray, u: np.ndarray, s: np.ndarray, vt: np.ndarray) -> tuple[float, float, float]:
    """LogME of one target column `y` (N) on features `f` (N x D) whose thin SVD is u, s, vt:
    (evidence / N, alpha, beta) at the fixed point."""
    N, D = f.shape
    sigma = s**2  # the nonzero eigenvalues of F^T F
    uy = u.T @ y  # y in the left singular basis
    y2 = float(y @ y)
    alpha, beta = 1.0, 1.0
    for _ in range(LOGME_MAX_ITER):
        lam = alpha / beta
        gamma = float((sigma / (sigma + lam)).sum())  # effective number of parameters
        # m = (F^T F + lam I)^-1 F^T y = V diag(s / (s^2 + lam)) U^T y
        coef = s / (sigma + lam) * uy
        m2 = float((coef**2).sum())
        # ||F m - y||^2: the part of y outside F's column space, plus the shrunk part inside it
        fitted = sigma / (sigma + lam) * uy
        res2 = float(((fitted - uy) ** 2).sum() + max(y2 - float(uy @ uy), 0.0))
        alpha = gamma / max(m2, 1e-12)
        beta = (N - gamma) / max(res2, 1e-12)
        if abs(alpha / beta - lam) / lam < LOGME_TOL:
            break
    lam = alpha / beta
    coef = s / (sigma + lam) * uy
    fitted = sigma / (sigma + lam) * uy
    m2 = float((coef**2).sum())
    res2 = float(((fitted - uy) ** 2).sum() + max(y2 - float(uy @ uy), 0.0))
    return _evidence(alpha, beta, sigma, D, N, res2, m2) / N, alpha, beta


def logme(features, labels) -> float:
    """LogME (You et al., ICML 2021, Algorithm 2): the mean over classes of the maximised log
    evidence per example of a Bayesian linear regression from the features to the class's 0/1
    indicator. Higher is better; it compares models on the same labels only.

    Where it departs from the paper (and its reference code):
    - the thin SVD of F (N x D), not the eigendecomposition of F^T F: with fewer examples than
      feature dimensions (10 shots x 10 classes = 100 rows, 128 features) the D - N zero
      eigenvalues enter log|A| as (D - N) log alpha exactly;
    - the fixed point is iterated to a relative change of alpha/beta below 1e-6 (at most 100
      iterations), not 1e-2 (at most 11): the evidence is then at its stationary point, which
      the tests check against a direct computation;
    - features are taken as the backbone gives them (no centring or scaling), in float64.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if f.ndim != 2 or len(f) != len(y) or len(f) < 2:
        raise UserError(f"LogME needs N x D features and N labels, N >= 2; got {f.shape} and {y.shape}")
    u, s, vt = np.linalg.svd(f, full_matrices=False)
    keep = s > s.max() * 1e-10 if len(s) and s.max() > 0 else np.zeros(len(s), bool)
    u, s, vt = u[:, keep], s[keep], vt[keep]
    classes = np.unique(y)
    return float(np.mean([logme_class(f, (y == c).astype(np.float64), u, s, vt)[0] for c in classes]))


def leep(source_probs, labels) -> float:
    """LEEP (Nguyen et al., ICML 2020): with theta(x) the source head's class probabilities,
    P(y, z) = 1/N sum_i theta(x_i)_z [y_i = y], P(y | z) = P(y, z) / P(z), and
    LEEP = 1/N sum_i log sum_z P(y_i | z) theta(x_i)_z. At most 0; higher is better."""
    theta = np.asarray(source_probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    classes, y = np.unique(y, return_inverse=True)
    joint = np.zeros((len(classes), theta.shape[1]))
    np.add.at(joint, y, theta)
    joint /= len(y)
    conditional = joint / np.maximum(joint.sum(0, keepdims=True), 1e-300)  # P(y | z)
    expected = (theta * conditional[y]).sum(1)  # sum_z P(y_i | z) theta(x_i)_z
    return float(np.mean(np.log(np.maximum(expected, 1e-300))))


def nce(source_probs, labels) -> float:
    """NCE (Tran et al., ICCV 2019): with z_i the source head's most probable class for x_i and
    P(y, z) the empirical joint of (y_i, z_i) over the N examples, NCE = -H(Y | Z) =
    sum_{y,z} P(y, z) log P(y | z). At most 0 (0 when the source labels determine the target labels);
    higher is better. Ties in the argmax go to the first class (np.argmax)."""
    theta = np.asarray(source_probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if theta.ndim != 2 or len(theta) != len(y) or len(y) < 1:
        raise UserError(f"NCE needs N x Z source probabilities and N labels; got {theta.shape} and {y.shape}")
    _, y = np.unique(y, return_inverse=True)
    _, z = np.unique(theta.argmax(1), return_inverse=True)  # only the source classes some example gets
    joint = np.zeros((y.max() + 1, z.max() + 1))
    np.add.at(joint, (y, z), 1.0)
    joint /= len(y)
    seen = joint > 0
    conditional = joint / joint.sum(0, keepdims=True)  # P(y | z); every z here has P(z) > 0
    return float((joint[seen] * np.log(conditional[seen])).sum())


def ledoit_wolf_shrinkage(centred: np.ndarray) -> float:
    """Ledoit and Wolf's (2004) coefficient s in (1 - s) S + s tr(S)/D I for the covariance
    S = X^T X / N of the centred rows X (N x D): the s that minimises the estimated Frobenius risk,
    in [0, 1]."""
    n, d = centred.shape
    cov = centred.T @ centred / n
    mu = np.trace(cov) / d
    delta = ((cov - mu * np.eye(d)) ** 2).sum() / d  # how far S is from the scaled identity
    x2 = centred**2
    beta = ((x2.T @ x2).sum() / n - (cov**2).sum()) / (n * d)  # the estimated variance of S
    if delta <= 0:
        return 1.0
    return float(min(max(beta, 0.0), delta) / delta)


def h_score(features, labels) -> float:
    """H-score (Bao et al., ICIP 2019): tr(cov(f)^-1 cov(E[f | y])), with cov(E[f | y]) the
    covariance of each example's class mean (the features centred, covariances normalised by N).
    Higher is better; with the exact inverse at most the number of classes - 1 (not so once shrunk).

    Where it departs from the paper: cov(f) is shrunk to (1 - s) cov(f) + s tr(cov(f))/D I with
    Ledoit and Wolf's s (as Ibrahim et al., "Newer is not always better", 2022, do for H-score),
    then pseudo-inverted. Few shots need it: with N <= D (10 shots x 10 classes = 100 rows, 128
    features) the plain (pseudo-)inverse gives exactly classes - 1 for any features in general
    position, so every candidate would tie. The shrinkage has its own bias: features of pure noise
    score about (classes - 1) D / N, more than classes - 1 when D > N. Features are taken as the
    backbone gives them, in float64."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if f.ndim != 2 or len(f) != len(y) or len(f) < 2:
        raise UserError(f"H-score needs N x D features and N labels, N >= 2; got {f.shape} and {y.shape}")
    f = f - f.mean(0)
    n, d = f.shape
    _, y = np.unique(y, return_inverse=True)
    means = np.zeros((y.max() + 1, d))
    np.add.at(means, y, f)
    means /= np.bincount(y)[:, None]
    g = means[y]  # E[f | y_i], already centred
    s = ledoit_wolf_shrinkage(f)
    cov = (1 - s) * (f.T @ f / n) + s * np.trace(f.T @ f / n) / d * np.eye(d)
    return float(np.trace(np.linalg.pinv(cov, hermitian=True) @ (g.T @ g / n)))


# -- the candidates -------------------------------------------------------------------------------


TEXT_ARCHITECTURES = ("minilm-l6", "text_cnn")  # tl_core/models/text.py: they read byte rows of text


def _reads_text(ckpt: dict) -> bool:
    if "data" in ckpt:
        return ckpt["data"].get("stored") == "text"
    return ckpt["model_spec"]["name"] in TEXT_ARCHITECTURES


def fits(ckpt: dict, data) -> str | None:
    """Why a candidate cannot embed the target (None: it can)."""
    if data.text:
        return None if _reads_text(ckpt) else "reads images, the target is text"
    if _reads_text(ckpt):
        return "reads text, the target is images"
    if ckpt["model_spec"]["in_channels"] != data.shape[0]:
        return f"reads {ckpt['model_spec']['in_channels']} channels, the target has {data.shape[0]}"
    return None


def packaged_candidates(data) -> list[str]:
    from tl_core.checkpoints import PACKAGED, packaged_models

    out = []
    for name, packaged in packaged_models().items():
        is_text = name in TEXT_ARCHITECTURES
        if data.text and is_text or not data.text and not is_text and packaged.in_channels == data.shape[0]:
            out.append(PACKAGED + name)
    return out


def workdir_candidates(data) -> list[str]:
    """Pretrain checkpoints in the work directory: `scratch` runs on a dataset other than the
    target, of the target's kind (text or images, the same channels)."""
    from tl_core.config import workdir

    folder = Path(workdir(), "models")
    if storage.is_s3(workdir()) or not folder.is_dir():
        return []
    out = []
    for ckpt in sorted(folder.glob("scratch-*/checkpoint.pt")):
        try:
            config = json.loads((ckpt.parent / "config.json").read_text())
            manifest = json.loads(Path(config["data"], "manifest.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):
            continue
        same_kind = (manifest.get("stored") == "text") == data.text and (
            data.text or (manifest.get("shape") or [None])[0] == data.shape[0])
        if manifest.get("hash") != data.hash and same_kind:
            out.append(str(ckpt))
    return out


def registry_candidates(data) -> list[str]:
    """models:/NAME/VERSION of every registered version whose input fits the target, where the
    tracking store answers (a store with no registry gives none)."""
    from tl_core import tracking

    try:
        import mlflow

        tracking.setup()
        versions = mlflow.MlflowClient().search_model_versions()
    except Exception:  # no registry here: the other candidates still rank
        return []
    out = []
    for v in versions:
        tags = v.tags or {}
        arch = tags.get("tl.architecture", "")
        is_text = arch in TEXT_ARCHITECTURES
        if is_text == bool(data.text):
            out.append(f"models:/{v.name}/{v.version}")
    return sorted(out)


def default_candidates(data) -> list[str]:
    return registry_candidates(data) + packaged_candidates(data) + workdir_candidates(data)


# -- ranking --------------------------------------------------------------------------------------


def target_dataset(uri: str, layout: dict | None = None):
    """A prepared dataset: the folder itself, or the source prepared as `tl prepare URI` does
    (`layout`: a text source's text_column, label_column, header)."""
    from tl_core.config import PrepareConfig
    from tl_core.data import load_prepared, prepare

    scheme, colon, _ = uri.partition(":")
    if not colon or scheme == "s3" or "/" in scheme:
        return load_prepared(uri)
    return prepare(PrepareConfig(uri=uri, **(layout or {})))[0]


def training_features(ckpt: dict, uri: str, data, shots, seed: int):
    """The features of the target's labelled training shots as `linear-probe` computes them (the
    same model, normalisation, rows and chunks, so the same cache entry), the labels, whether
    they came from the cache, and the candidate's source head (None without one)."""
    from tl_core.config import TrainConfig
    from tl_core.data import sample_shots
    from tl_core.models import INPUT_STATS
    from tl_core.strategies import create_strategy
    from tl_core.strategies.base import has_source_head
    from tl_core.strategies.linear_probe import FEATURE_BATCH, cached_features, images_key
    from tl_core.train.loop import streams

    cfg = TrainConfig(data=data.path, strategy="linear-probe", backbone=uri, shots=shots, seed=seed)
    train_idx, _ = sample_shots(data.labels("train"), shots, seed, data.classes)
    strategy = create_strategy(cfg)
    model, spec = strategy.build_model(len(data.classes), data.shape, ckpt)
    data = data.normalised_as(INPUT_STATS.get(spec["name"]))
    rows = data.rows("train", train_idx)
    if streams(cfg, data, rows, strategy):
        features, hit = strategy.rows_features(model, rows, data.normalise)
        y = torch.from_numpy(rows.labels())
    else:
        x, y = rows.tensors()
        chunks = (x[i : i + FEATURE_BATCH * 8] for i in range(0, len(x), FEATURE_BATCH * 8))
        features, hit = cached_features(model, images_key(x), chunks)
    head = None
    if has_source_head(ckpt):
        head = (ckpt["model"]["head.weight"].float(), ckpt["model"]["head.bias"].float())
    return features.double(), y, hit, head


def score_candidate(uri: str, data, shots, seed: int) -> dict:
    from tl_core.checkpoints import load_checkpoint

    started = time.perf_counter()
    ckpt = load_checkpoint(uri)
    problem = fits(ckpt, data)
    if problem:
        return {"candidate": uri, "skipped": problem}
    features, y, hit, head = training_features(ckpt, uri, data, shots, seed)
    row = {"candidate": uri, "architecture": ckpt["model_spec"]["name"], "feature_dim": int(features.shape[1]),
           "examples": int(len(y)), "logme": logme(features.numpy(), y.numpy()), "leep": None, "nce": None,
           "hscore": h_score(features.numpy(), y.numpy()), "feature_cache_hit": hit}
    if head is not None:
        probs = torch.softmax(features.float() @ head[0].T + head[1], dim=1).double().numpy()
        row["leep"], row["nce"] = leep(probs, y.numpy()), nce(probs, y.numpy())
    row["seconds"] = time.perf_counter() - started
    return row


def resolve(target: str, candidates: list[str] | None, shots, layout: dict | None = None, also=()):
    """The target's prepared dataset and the candidates' URIs (`candidates`, else the default ones
    and `also`), or one error line: before any run starts."""
    if shots == 0:
        raise UserError("ranking needs labels: give --shots N (N >= 1) or all")
    data = target_dataset(target, layout)
    uris = list(dict.fromkeys(candidates or [*default_candidates(data), *also]))
    if not uris:
        raise UserError(f"no candidate fits {target} ({'text' if data.text else f'images, {data.shape[0]} channels'}): "
                        "register a model, pretrain one (tl pretrain), or pass --candidates URI,URI")
    return data, uris


def rank(target: str, shots=10, seed: int = 0, candidates: list[str] | None = None,
         say=lambda message: None, resolved=None, also=()) -> dict:
    """Score every candidate on the target's labelled training shots; rank by LogME."""
    started = time.perf_counter()
    data, uris = resolved or resolve(target, candidates, shots, also=also)
    rows, skipped = [], []
    for uri in uris:
        say(f"scoring {uri}")
        row = score_candidate(uri, data, shots, seed)
        (skipped if "skipped" in row else rows).append(row)
    if not rows:
        raise UserError(f"no candidate fits {target}: " + "; ".join(f"{r['candidate']} {r['skipped']}" for r in skipped))
    rows.sort(key=lambda r: -r["logme"])
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return {"target": data.path, "target_hash": data.hash, "shots": shots, "seed": seed, "score": "logme",
            "table": rows, "skipped": skipped, "best": rows[0]["candidate"], "seconds": time.perf_counter() - started}


def rank_step(cfg, say=lambda message: None) -> dict:
    """`tl rank` as an MLflow run: the table logged as metrics (rank_<i>.logme, .leep, .nce, .hscore)
    and ranking.json. Bad input (an unknown target, no candidate) fails before the run starts."""
    from tl_core import tracking

    resolved = resolve(cfg.target, cfg.candidates, cfg.shots,
                       {"text_column": cfg.text_column, "label_column": cfg.label_column, "header": cfg.header})
    with tracking.run(f"rank {cfg.target}", params=cfg.model_dump(), tags={"tl.step": "rank"}) as active:
        result = rank(cfg.target, cfg.shots, cfg.seed, cfg.candidates, say, resolved)
        log_ranking(result)
    return {**result, "run_id": active.info.run_id}


def log_ranking(result: dict) -> None:
    """The ranking in the active MLflow run: metrics per rank, ranking.json, the winner as a tag."""
    import mlflow

    from tl_core import tracking

    metrics = {}
    for row in result["table"]:
        metrics[f"rank_{row['rank']}.logme"] = row["logme"]
        for score in ("leep", "nce", "hscore"):  # leep and nce: None without a source head
            if row[score] is not None:
                metrics[f"rank_{row['rank']}.{score}"] = row[score]
        metrics[f"rank_{row['rank']}.seconds"] = row["seconds"]
    metrics["rank_seconds"] = result["seconds"]
    tracking.log_metrics(metrics)
    tracking.log_json(result, "ranking.json")
    mlflow.set_tag("tl.rank_best", result["best"])


def with_ranked_backbone(cfg, transfer, also=()) -> dict:
    """`--backbone auto`: rank the default candidates (and `also`: the pipeline's own pretrained
    source) on the run's own shots and seed, run `transfer` with the first, and record the ranking
    with its MLflow run (ranking.json, the rank_<i> metrics, tags tl.backbone_auto and
    tl.rank_best) and in its summary (`rank`)."""
    import mlflow

    from tl_core import tracking

    ranking = rank(cfg.data, cfg.shots, cfg.seed, also=also)
    summary = transfer(cfg.model_copy(update={"backbone": ranking["best"]}))
    tracking.setup()
    with mlflow.start_run(run_id=summary["run_id"]):  # the finished transfer run, reopened to add the ranking
        log_ranking(ranking)
        mlflow.set_tag("tl.backbone_auto", "true")
    return {**summary, "rank": ranking}


def ranked_source(cfg, say, prepare_target) -> tuple[dict, dict, dict, dict]:
    """`tl run --backbone auto`: the target prepared (`prepare_target()`, prepare_step's summary),
    the default candidates ranked on the shots of the first seed, the ranking logged into the
    active (parent) run; the winner stands where the pretrained source would: (target, source,
    pretrain, ranking) with source {"path": winner, "ranked": True} and pretrain {"checkpoint":
    winner, "metrics": None}."""
    import mlflow

    say(f"preparing the target {cfg.target}")
    target = prepare_target()
    say("ranking the candidate backbones (tl rank)")
    ranking = rank(target["path"], cfg.shots, cfg.seeds[0], say=say)
    log_ranking(ranking)
    mlflow.set_tag("tl.backbone_auto", "true")
    say(f"the backbone is {ranking['best']} (LogME {ranking['table'][0]['logme']:.4f}, first of "
        f"{len(ranking['table'])})")
    best = ranking["best"]
    return target, {"path": best, "ranked": True}, {"checkpoint": best, "metrics": None}, ranking
