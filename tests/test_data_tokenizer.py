"""Tokenizers: word-level shapes tokenizer, Llama-style tokenizer.json, special ids, save/load round trip."""

import json
import pickle

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from data_fixtures import llama_style_tokenizer_json

from flamingo_fast.data import (
    EOC_TOKEN,
    IMAGE_TOKEN,
    Tokenizer,
    build_word_tokenizer,
    load_tokenizer,
    make_tokenizer,
    shapes_tokenizer,
    shapes_words,
)


def test_word_tokenizer_special_ids_and_vocab():
    tok = shapes_tokenizer()
    words = shapes_words()
    assert 30 <= len(words) <= 45  # small, regular vocabulary
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.base_vocab_size == 4 + len(words)
    assert tok.image_token_id == tok.base_vocab_size
    assert tok.eoc_token_id == tok.base_vocab_size + 1
    assert tok.vocab_size == tok.base_vocab_size + 2 == len(tok)


def test_word_tokenizer_lowercases_and_splits_punctuation():
    tok = build_word_tokenizer(["short", "answer", "red", ":", "?", "what"])
    ids = tok.encode("<image>Short answer:RED what?<|endofchunk|>")
    tokens = [tok.hf_tokenizer.id_to_token(i) for i in ids]
    assert tokens == [IMAGE_TOKEN, "short", "answer", ":", "red", "what", "?", EOC_TOKEN]
    assert tok.encode("zebra") == [tok.unk_id]
    assert tok.bos_id not in tok.encode("red")  # encode never adds bos/eos


def test_word_tokenizer_round_trip_and_decode_modes():
    tok = shapes_tokenizer()
    text = "a red circle left of an orange star"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(f"{IMAGE_TOKEN}Output:{text}{EOC_TOKEN}")
    assert tok.decode(ids) == f"output : {text}"  # specials stripped
    assert tok.decode(ids, skip_special_tokens=False).startswith(IMAGE_TOKEN)
    generated = tok.encode("red") + [tok.eoc_token_id] + tok.encode("blue square")
    assert tok.decode(generated, stop_at_end=True) == "red"
    assert tok.decode(tok.encode("green") + [tok.eos_id, tok.pad_id], stop_at_end=True) == "green"


def test_word_tokenizer_rejects_bad_words():
    with pytest.raises(ValueError, match="whitespace"):
        build_word_tokenizer(["two words"])
    with pytest.raises(ValueError, match="reserved"):
        build_word_tokenizer(["<image>"])


def test_save_load_round_trip_keeps_ids(tmp_path):
    tok = shapes_tokenizer()
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path / "tok")
    for attr in ("pad_id", "bos_id", "eos_id", "unk_id", "image_token_id", "eoc_token_id", "vocab_size", "base_vocab_size"):
        assert getattr(loaded, attr) == getattr(tok, attr), attr
    text = f"{IMAGE_TOKEN}Question:how many shapes? Short answer:two{EOC_TOKEN}"
    assert loaded.encode(text) == tok.encode(text)


def test_tokenizer_pickles_for_process_workers():
    tok = shapes_tokenizer()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("a blue cross") == tok.encode("a blue cross")
    assert clone.image_token_id == tok.image_token_id


def test_llama_style_tokenizer_gets_flamingo_tokens_last(tmp_path):
    path, base = llama_style_tokenizer_json(tmp_path)
    tok = load_tokenizer(path)
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.pad_id == tok.unk_id  # Llama has no pad token
    assert tok.base_vocab_size == base
    assert (tok.image_token_id, tok.eoc_token_id) == (base, base + 1)
    assert tok.vocab_size == base + 2
    ids = tok.encode(f"{IMAGE_TOKEN}Output: the red fox{EOC_TOKEN}")
    assert ids[0] == tok.image_token_id and ids[-1] == tok.eoc_token_id
    assert tok.bos_id not in ids  # the template's bos is not added by encode
    assert tok.decode(ids) == "Output: the red fox"
    # Saved and reloaded (now already holding the two tokens): same ids, not appended twice.
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert (again.image_token_id, again.eoc_token_id, again.vocab_size) == (base, base + 1, base + 2)
    assert json.loads((tmp_path / "saved" / "special_tokens_map.json").read_text())["bos_token"] == "<s>"


def test_special_tokens_map_with_hf_dict_entries(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    _, base = llama_style_tokenizer_json(folder)
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<s>"}, "eos_token": {"content": "</s>"}, "pad_token": "</s>"})
    )
    tok = load_tokenizer(folder)
    assert tok.pad_id == tok.eos_id == 2
    assert tok.image_token_id == base


def test_flamingo_tokens_in_wrong_place_are_rejected(tmp_path):
    tok = HFTokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2, IMAGE_TOKEN: 3, "x": 4, EOC_TOKEN: 5}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="last two ids"):
        Tokenizer(tok, bos="<s>", eos="</s>", unk="<unk>")


def test_missing_role_token_is_a_clear_error():
    tok = HFTokenizer(models.WordLevel({"<unk>": 0, "x": 1}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="bos token"):
        Tokenizer(tok, bos="<s>", eos="</s>")


def test_make_tokenizer_from_config_value(tmp_path):
    assert make_tokenizer("shapes").encode("a red star") == shapes_tokenizer().encode("a red star")
    path, base = llama_style_tokenizer_json(tmp_path)
    assert make_tokenizer(str(tmp_path)).image_token_id == base
    with pytest.raises(FileNotFoundError):
        make_tokenizer(tmp_path / "nowhere")
