"""Where the escalation detector's and the reranker's rows come from: the real public files (the vadersentiment
source archive fetched from the package index, chitchat-dataset's JSON) and the refreshed traffic."""

import io
import tarfile

import pytest

from qat_tasks.core.config import ConfigError, parse_config
from qat_tasks.data import catalogue, public_data
from qat_tasks.data import role_splits as role_data

from .conftest import tiny_config_dict


def _hutto_archive(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            raw = text.encode("latin-1")
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def test_the_real_vader_archive_is_fetched_from_the_package_index_and_parsed(tiny_config):
    raw = public_data.read_source(tiny_config, public_data.VADER_SOURCE)
    rows = public_data.hutto_sentences(raw)
    by_corpus = {c: [r for r in rows if r["corpus"] == c] for c in ("amazon_review", "tweet")}
    assert len(by_corpus["amazon_review"]) == 3708 and len(by_corpus["tweet"]) == 4200
    assert all(-4 <= r["rating"] <= 4 and r["text"] for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)


def test_a_malformed_ratings_line_is_named():
    archive = _hutto_archive({"amazonReviewSnippets_GroundTruth.txt": "1_1\t-0.9\tbroken screen\r\n1_2\tbad\tx\r\n",
                              "tweets_GroundTruth.txt": "1\t2.1\tlove it\r\n"})
    with pytest.raises(public_data.PublicDataError, match=r"amazonReviewSnippets_GroundTruth.txt line 2"):
        public_data.hutto_sentences(archive)
    with pytest.raises(public_data.PublicDataError, match="expected the"):
        public_data.hutto_sentences(_hutto_archive({"tweets_GroundTruth.txt": "1\t2.1\tlove it\r\n"}))


def test_sources_that_do_not_exist_fail_with_the_fix(tiny_config):
    with pytest.raises(public_data.PublicDataError, match="not installed"):
        public_data.read_source(tiny_config, "pkg://no_such_package_here/data.json")
    with pytest.raises(public_data.PublicDataError, match="does not exist"):
        public_data.read_source(tiny_config, "/nonexistent/hutto.tar.gz")
    with pytest.raises(public_data.PublicDataError, match="expected pypi-sdist"):
        public_data.read_source(tiny_config, "pypi-sdist://vadersentiment/additional_resources/x")


def test_chitchat_conversations_are_the_real_dataset(tiny_config):
    dialogues = public_data.chitchat_dialogues(public_data.read_source(tiny_config, public_data.CHITCHAT_SOURCE))
    assert len(dialogues) == 7168
    assert sum(len(m) for m in dialogues.values()) > 100_000
    with pytest.raises(public_data.PublicDataError, match="layout"):
        public_data.chitchat_dialogues(b'{"x": {"no_messages": 1}}')


@pytest.fixture(scope="module")
def calibration_uri(traffic_dir, tmp_path_factory):
    from qat_tasks.data.refresh import refresh

    from .conftest import WINDOW

    data = tiny_config_dict(str(traffic_dir))
    data["state_dir"] = str(tmp_path_factory.mktemp("role-data-state"))
    return refresh(parse_config(data, "t"), *WINDOW, progress=False).uri


def test_escalation_rows_come_from_rated_sentences_and_traffic(tiny_config, calibration_uri):
    splits = role_data.load(tiny_config, "escalation-detector", calibration_uri)
    dc = tiny_config.model("escalation-detector").data
    ids = {s: {r["id"] for r in splits[s]} for s in role_data.SPLITS}
    assert not (ids["calibration"] & ids["evaluation"]) and not (ids["qat_train"] & ids["evaluation"])
    for split in role_data.SPLITS:
        assert len(splits[split]) == getattr(dc.max_rows, split)
        assert {r["label"] for r in splits[split]} == {"calm", "frustrated"}
    rated = [r for s in role_data.SPLITS for r in splits[s] if r["label_source"] == "human_rated"]
    traffic = [r for s in role_data.SPLITS for r in splits[s] if r["source"] == "mangaassist"]
    assert rated and traffic
    assert splits.summary["ambiguous_left_out"] > 0
    role_data._CACHE.clear()
    assert role_data.load(tiny_config, "escalation-detector", calibration_uri).summary["digest"] == \
        splits.summary["digest"], "the same calibration version gives the same rows"


def test_reranking_groups_hold_one_relevant_passage_among_twenty(tiny_config, calibration_uri):
    splits = role_data.load(tiny_config, "reranker", calibration_uri)
    dc = tiny_config.model("reranker").data
    groups: dict[str, list[dict]] = {}
    for r in splits["evaluation"]:
        groups.setdefault(r["group"], []).append(r)
    assert len(groups) == dc.max_rows.evaluation
    for rows in groups.values():
        assert len(rows) == dc.candidates_per_query
        assert sum(r["label"] == "relevant" for r in rows) == 1
        assert len({r["text"] for r in rows}) == 1 and len({r["text_pair"] for r in rows}) == len(rows)
    sources = {r["source"] for r in splits["evaluation"]}
    assert sources == {"chitchat", "mangaassist"}
    train_groups = {r["group"] for r in splits["qat_train"]}
    assert len(splits["qat_train"]) == len(train_groups) * (1 + dc.train_negatives)
    product = next(rows for rows in groups.values() if rows[0]["source"] == "mangaassist")
    title, vol, fmt = catalogue.product_asked(product[0]["text"])
    assert product[0]["text_pair"] == catalogue.describe_product(title, vol, fmt)


@pytest.mark.parametrize("text, asked", [
    ("do you have One Piece volume 5", ("One Piece", 5, "paperback")),
    ("is the Berserk hardcover deluxe edition back in stock yet", ("Berserk", 1, "hardcover deluxe edition")),
    ("avez-vous Naruto tome 12 ?", ("Naruto", 12, "paperback")),
    ("Chainsaw Manの7巻は在庫ありますか", ("Chainsaw Man", 7, "paperback")),
    ("how much is Slam Dunk vol. 3?", ("Slam Dunk", 3, "paperback")),
    ("do you ship to Canada?", None),
])
def test_product_searches_name_title_volume_and_format(text, asked):
    assert catalogue.product_asked(text) == asked


def test_data_settings_for_the_wrong_role_are_rejected_by_name(traffic_dir):
    data = tiny_config_dict(str(traffic_dir))
    data["models"][1]["data"]["candidates_per_query"] = 10
    with pytest.raises(ConfigError, match=r"data.candidates_per_query does not apply to role 'escalation_detector'"):
        parse_config(data, "t")
    data = tiny_config_dict(str(traffic_dir))
    data["models"][0]["data"] = {"target_recall": 0.9}
    with pytest.raises(ConfigError, match="data.target_recall does not apply"):
        parse_config(data, "t")
    data = tiny_config_dict(str(traffic_dir))
    data["models"][1]["data"]["frustrated_max_rating"] = 0.5
    with pytest.raises(ConfigError, match="must be below calm_min_rating"):
        parse_config(data, "t")
    cfg = parse_config(tiny_config_dict(str(traffic_dir)), "t")
    assert parse_config(cfg.model_dump(mode="json"), "round trip") == cfg
