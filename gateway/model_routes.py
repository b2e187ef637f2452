"""Which model's inference replicas answer a request: the request's ``model``, routed to that model's pool.

The gateway serves every model of ``NLPMESH_GATEWAY_INFERENCE_ADDRS`` ({catalogue id: address}), each
through a pool of its own (gateway/inference_pool.py): channels, prefix-affine router, capacity gate. Without
it, one pool at ``inference_addr`` serves the model its replicas report (deployments of one model keep
working unchanged). A request names a model by its catalogue id, or by the catalogue's ``name`` for it (what
callers used before the catalogue); responses always carry the id. Empty = the default model.

The gateway starts serving once the default model answered ModelInfo; every other model is learnt in the
background (``learn_in_background``) and is UNAVAILABLE until then.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.inference_pool import InferencePool
from meshkit.errors import MeshError, NotFound, Unavailable
from modelfiles.catalogue import Catalogue

log = logging.getLogger("nlpmesh.gateway.models")

_RETRY_S = 0.5  # how often a model not ready yet is asked again


@dataclass(frozen=True)
class ServedModel:
    """One model as ListModels shows it."""

    id: str
    revision: str
    context_length: int
    engine: str
    ready: bool
    default: bool


class ModelRoutes:
    def __init__(self, pools: list[InferencePool], default: InferencePool, aliases: dict[str, str] | None = None):
        self.pools = pools
        self.default = default
        self._aliases = aliases or {}  # catalogue name: catalogue id
        self._learning: list[asyncio.Task] = []

    @classmethod
    def from_settings(cls, settings, catalogue: Catalogue) -> ModelRoutes:
        """The pools the settings name; ValueError (the gateway does not start) when the default model is not
        one of them."""
        addresses = settings.inference_addrs
        if not addresses:  # one pool; its model is what it reports (or default_model, when that is set)
            pool = InferencePool(settings, model=settings.default_model or None)
            return cls([pool], pool, _aliases(catalogue, None))
        default = settings.default_model or next(iter(addresses))
        if default not in addresses:
            raise ValueError(f"NLPMESH_GATEWAY_DEFAULT_MODEL={default!r} is not one of the models of "
                             f"NLPMESH_GATEWAY_INFERENCE_ADDRS ({', '.join(addresses)})")
        pools = [InferencePool(settings, address, model=model) for model, address in addresses.items()]
        pools.sort(key=lambda pool: pool.model != default)  # the default first, as ListModels shows them
        return cls(pools, pools[0], _aliases(catalogue, addresses))

    @property
    def ids(self) -> list[str]:
        return [pool.model for pool in self.pools if pool.model is not None]

    def model_id(self, requested: str) -> str | None:
        """The id of the model ``requested`` names, an alias resolved (empty: the default's), before any
        readiness check; None for the default while its replicas have not said which model they serve."""
        if requested:
            return self._aliases.get(requested, requested)
        return self.default.model

    def resolve(self, requested: str) -> InferencePool:
        """The pool of the model ``requested`` names (empty: the default). NotFound naming the models served,
        for a model this mesh does not serve; Unavailable for one whose replicas have not answered yet."""
        if requested:
            wanted = self._aliases.get(requested, requested)
            pool = next((pool for pool in self.pools if pool.model == wanted), None)
            if pool is None:
                raise NotFound(f"unknown model {requested!r}; this mesh serves {', '.join(self.ids)}")
        else:
            pool = self.default
        if pool.info is None:
            raise Unavailable(f"model {pool.model or requested or 'default'} is not ready yet")
        return pool

    def listing(self) -> list[ServedModel]:
        return [ServedModel(pool.model, pool.info.revision if pool.info else "",
                            pool.info.context_length if pool.info else 0,
                            pool.info.engine if pool.info else "", pool.serving, pool is self.default)
                for pool in self.pools if pool.model is not None]

    def learn_in_background(self, pools: Iterable[InferencePool], timeout_s: float) -> None:
        """Asks each of ``pools`` for its ModelInfo until it answers; the model is served from then on."""
        loop = asyncio.get_running_loop()
        self._learning += [loop.create_task(self._learn(pool, timeout_s)) for pool in pools]

    async def _learn(self, pool: InferencePool, timeout_s: float) -> None:
        said = None
        while True:
            try:
                info = await pool.model_info(timeout_s)
            except MeshError as error:
                if str(error) != said:  # once per reason, not every retry
                    said = str(error)
                    log.info("model %s not ready yet: %s", pool.model, said)
                await asyncio.sleep(_RETRY_S)
                continue
            log.info("model %s ready (revision %s)", info.model, info.revision)
            return

    async def close(self) -> None:
        for task in self._learning:
            task.cancel()
        await asyncio.gather(*self._learning, return_exceptions=True)


def _aliases(catalogue: Catalogue, served: Iterable[str] | None) -> dict[str, str]:
    """Each catalogue model's name as an alias of its id (of the models served, when they are known)."""
    return {model.name: model.id for model in catalogue.models
            if model.name != model.id and (served is None or model.id in served)}
