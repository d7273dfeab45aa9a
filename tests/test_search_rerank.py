"""Re-ranking index searches with the ITM head: `SearchReranker`, `mmssl index search --rerank itm`
and `mmssl serve --rerank itm` (a request's `rerank_k`, its bounds, what cannot be re-ranked)."""
import base64
import json

import httpx
import pytest
import torch

from eval.index.rerank import SearchReranker, _reorder
from eval.embed import precision_context
from eval.index.search import Hit, Searcher
from helpers import config, serving
from mmssl.cli import main
from mmssl.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def itm_index(world, tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("rerank")
    train(config(world, root / "run", "loss.itm_weight=1", "train.steps=4"))
    assert main(["index", "build", "--checkpoint", str(root / "run"), "--data", str(world / "syn" / "val"),
                 "--out", str(root / "index"), "--workers", "0", "--modality", "image,text"]) == 0
    return root / "index"


@pytest.fixture(scope="module")
def reranker(itm_index):
    return SearchReranker.for_searcher(Searcher.open(str(itm_index)))


def test_reorder_sorts_by_match_and_keeps_unscored_hits_last():
    hits = [Hit(r, 1.0 - r / 10, r, f"k{r}", "c") for r in range(1, 6)]
    out = _reorder(hits, [0.5, None, 2.0, 0.5, -1.0])
    assert [hit.key for hit in out] == ["k3", "k1", "k4", "k5", "k2"]
    assert [hit.rank for hit in out] == [1, 2, 3, 4, 5] and out[-1].match is None and out[0].match == 2.0


def test_text_query_hits_are_the_same_candidates_ordered_by_the_heads_scores(reranker):
    from mmssl.models.tower_tokens import image_tokens, text_tokens, text_valid

    searcher = reranker.searcher
    query = "a red circle on the left"
    candidates = searcher.search_texts([query], 8)[0]
    reranked = reranker.rerank("text", [query], [candidates])[0]
    assert sorted(hit.id for hit in reranked) == sorted(hit.id for hit in candidates)
    matches = [hit.match for hit in reranked]
    assert matches == sorted(matches, reverse=True) and None not in matches
    # each match is the head's log-odds for that stored image and the query
    loaded = searcher.encoder.loaded
    bf16 = loaded.autocast_dtype is not None      # precision auto: bf16 where the CPU has it (AVX512-BF16, AMX)
    for hit in reranked[:3]:
        tensor = searcher.encoder.prepare_image(reranker.images.read(hit.id)[0])
        with torch.inference_mode(), precision_context(loaded):
            tokens = loaded.tokenizer([query])
            expected = reranker.head.match_score(image_tokens(loaded.model.visual, tensor[None]).tokens,
                                                 text_tokens(loaded.model, tokens).tokens, text_valid(loaded.model, tokens))
        assert hit.match == pytest.approx(float(expected), abs=3e-2 if bf16 else 1e-4)   # batched vs one pair
    assert reranker.cache_bytes_used > 0      # stored images' tokens are cached for the next query
    again = reranker.rerank("text", [query], [candidates])[0]
    assert [hit.id for hit in again] == [hit.id for hit in reranked]


def test_image_query_over_captions_is_reranked_and_other_pairs_are_refused(reranker, world):
    from eval.index.rerank import NotRerankable

    searcher = reranker.searcher
    image = searcher.encoder.prepare_image(reranker.images.read(0)[0])
    candidates = searcher.search_images([image], 6, "text")[0]
    reranked = reranker.rerank("image", [image], [candidates], "text")[0]
    assert sorted(hit.id for hit in reranked) == sorted(hit.id for hit in candidates)
    assert all(hit.match is not None for hit in reranked)
    with pytest.raises(NotRerankable, match="text query over images or an image query over captions"):
        reranker.rerank("image", [image], [candidates], "image")


def test_index_search_cli_reranks(itm_index, tmp_path, capsys):
    out = tmp_path / "hits.json"
    assert main(["index", "search", "--index", str(itm_index), "--text", "a blue square", "-k", "3",
                 "--rerank", "itm", "--rerank-k", "8", "--output", str(out)]) == 0
    assert "match" in capsys.readouterr().out.splitlines()[0]
    record = json.loads(out.read_text())
    assert record["rerank"] == {"scorer": "itm", "k": 8} and len(record["results"]) == 3
    assert all(isinstance(hit["match"], float) for hit in record["results"])
    plain = Searcher.open(str(itm_index)).search_texts(["a blue square"], 8)[0]
    assert {hit["id"] for hit in record["results"]} <= {hit.id for hit in plain}
    assert main(["index", "search", "--index", str(itm_index), "--text", "x", "--rerank", "itm",
                 "--rerank-k", "999"]) == 2
    assert main(["index", "search", "--index", str(itm_index), "--text", "x", "--rerank", "itm",
                 "--modality", "text"]) == 2


def test_serve_reranks_text_queries_within_bounds(itm_index):
    searcher = Searcher.open(str(itm_index))
    with serving(searcher, rerank="itm", rerank_k=8) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            reranked = client.post("/search", json={"text": "a green star", "k": 4})
            assert reranked.status_code == 200
            results = reranked.json()["results"]
            assert len(results) == 4 and all(isinstance(r["match"], float) for r in results)
            assert [r["match"] for r in results] == sorted((r["match"] for r in results), reverse=True)
            plain = client.post("/search", json={"text": "a green star", "k": 4, "rerank_k": 0}).json()["results"]
            assert all("match" not in r for r in plain)
            cosine = searcher.search_texts(["a green star"], 4)[0]
            assert [r["key"] for r in plain] == [hit.key for hit in cosine]
            wide = client.post("/search", json={"text": "a green star", "k": 2, "rerank_k": 16}).json()["results"]
            assert len(wide) == 2
            for body, message in (({"text": "x", "rerank_k": 65}, "rerank_k must be an integer in 0..64"),
                                  ({"text": "x", "rerank_k": True}, "rerank_k must be an integer"),
                                  ({"image": base64.b64encode(b"not decoded before the check").decode(), "rerank_k": 4},
                                   "text query over images")):
                response = client.post("/search", json=body)
                assert response.status_code == 400 and message in response.json()["error"], response.text
    with serving(searcher) as url:
        response = httpx.post(url + "/search", json={"text": "x", "rerank_k": 4}, timeout=30)
        assert response.status_code == 400 and "start it with --rerank itm" in response.json()["error"]
