"""Model names as Ollama clients send them (``name:tag``, ``name:latest``, ``hf.co/…:QUANT``)
resolved to lmscli's keys, identifiers and links, and the names the listings give back."""

from __future__ import annotations

from typing import Any

from lmscli import catalog
from lmscli.server.errors import APIError, shorten
from lmscli.server.models import ModelManager

LATEST = ":latest"
HF_HOSTS = ("hf.co/", "huggingface.co/")


def listed(key: str) -> str:
    """The name a listing shows: Ollama's names always carry a tag."""
    return key if ":" in key else key + LATEST


def candidates(name: str) -> list[str]:
    """The name as sent, then without ``:latest`` (what ``listed`` added)."""
    if name.lower().endswith(LATEST) and len(name) > len(LATEST):
        return [name, name[:-len(LATEST)]]
    return [name]


def not_found(name: str) -> APIError:
    return APIError(404, f"model '{shorten(name)}' not found, try pulling it first",
                    param="model", code="model_not_found")


def linked(links: Any, name: str) -> str | None:
    """The name under which a link serves the model, or None for a local one."""
    return next((c for c in candidates(name) if links.target(c) is not None), None)


def local_key(models: ModelManager, name: str) -> str:
    """The loaded identifier or downloaded key ``name`` means: exact first, then the best
    fuzzy match over the downloaded keys, as ``lms load -y`` picks (``smollm2:135m`` finds
    ``smollm2-135m-instruct``)."""
    for candidate in candidates(name):
        if models.find_loaded(candidate) is not None or catalog.find_model(candidate):
            return candidate
    pattern = candidates(name)[-1].replace(":", "-")
    if pattern.isprintable() and len(pattern) <= 200:
        keys = [m.model_key for m in models.downloaded()]
        matches = catalog.fuzzy_filter(pattern, keys)
        if matches:
            return matches[0][0]
    raise not_found(name)


def local_model(models: ModelManager, name: str) -> Any:
    """The downloaded model (``catalog.LocalModel``) ``name`` means."""
    key = local_key(models, name)
    entry = models.find_loaded(key)
    return entry.model if entry is not None else models.resolve_downloaded(key)


def exact_model(name: str) -> Any:
    """The downloaded model called exactly ``name`` (with or without ``:latest``): a delete
    never guesses."""
    for candidate in candidates(name):
        model = catalog.find_model(candidate)
        if model is not None:
            return model
    raise APIError(404, f"model '{shorten(name)}' not found", param="model",
                   code="model_not_found")


def pull_target(name: str) -> str:
    """What ``lms get`` fetches for an Ollama name: ``hf.co/USER/REPO:QUANT`` is Hugging
    Face's ``USER/REPO@QUANT``; a short name is the built-in model it fuzzily matches."""
    for host in HF_HOSTS:
        if name.lower().startswith(host):
            repo, _, quant = name[len(host):].partition(":")
            return f"{repo}@{quant}" if quant and quant.lower() != "latest" else repo
    base = candidates(name)[-1]
    if "/" in base or base.lower() in catalog.BUILTIN_MODELS:
        return base
    matches = catalog.fuzzy_filter(base.replace(":", "-"), list(catalog.BUILTIN_MODELS))
    return matches[0][0] if matches else base
