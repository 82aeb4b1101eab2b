import torch

from mpt_utils.data import calibration_windows, load_text, news_documents, wiki_articles
from mpt_utils.testing import tiny_tokenizer


def test_embedded_wiki_is_clean_real_articles():
    articles = wiki_articles()
    assert len(articles) > 50
    text = "\n".join(t for _, t in articles)
    assert "#REDIRECT" not in text.upper() and "[[" not in text and "{{" not in text


def test_embedded_splits_are_deterministic_and_disjoint():
    for name in ("embedded-wiki", "embedded-news"):
        ev, cal = load_text(name, "eval"), load_text(name, "calibration")
        assert ev == load_text(name, "eval") and cal == load_text(name, "calibration")
        ev_docs, cal_docs = set(ev.split("\n\n")), set(cal.split("\n\n"))
        assert ev_docs and cal_docs and not (ev_docs & cal_docs)
    titles_eval = {line for line in load_text("embedded-wiki", "eval").splitlines() if line.startswith("= ")}
    titles_cal = {line for line in load_text("embedded-wiki", "calibration").splitlines() if line.startswith("= ")}
    assert titles_eval and titles_cal and not (titles_eval & titles_cal)
    assert len(news_documents()) > 100


def test_calibration_windows_are_seeded():
    tok = tiny_tokenizer()
    a = calibration_windows(tok, "embedded-news", n=4, seqlen=64, seed=3)
    b = calibration_windows(tok, "embedded-news", n=4, seqlen=64, seed=3)
    c = calibration_windows(tok, "embedded-news", n=4, seqlen=64, seed=4)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_local_text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"paragraph {i} " * 20 for i in range(20)))
    ev, cal = load_text(str(path), "eval"), load_text(str(path), "calibration")
    assert ev and cal and not (set(ev.split("\n\n")) & set(cal.split("\n\n")))


def test_small_local_file_serves_both_splits(tmp_path):
    # two paragraphs that hash to the same split must not leave the other split empty
    path = tmp_path / "two.txt"
    path.write_text("second paragraph\n\nthird paragraph\n")  # both hash to the eval split
    for split in ("eval", "calibration"):
        assert load_text(str(path), split) == "second paragraph\n\nthird paragraph"


def test_utf8_bom_is_ignored(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello".encode())
    assert load_text(str(path)) == "hello"
