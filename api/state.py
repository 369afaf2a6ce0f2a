"""What the routes share, built by the app's lifespan and kept on `app.state.server`."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from shoal.api.chat import ChatService
from shoal.api.config import ServerConfig
from shoal.api.loads import LoadTracker
from shoal.api.metrics import PrometheusStatLogger
from shoal.api.sampling import SamplingDefaults
from shoal.api.served_model import ServedModel
from shoal.engine.async_engine import AsyncEngine


@dataclass(frozen=True)
class ServerState:
    engine: AsyncEngine
    config: ServerConfig
    model: ServedModel
    metrics: PrometheusStatLogger
    chat: ChatService
    sampling_defaults: SamplingDefaults
    loads: LoadTracker


def server_state(request: Request) -> ServerState:
    return request.app.state.server
