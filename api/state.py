"""What the routes share, built by the app's lifespan and kept on `app.state.server`."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from shoal.api.chat import ChatService
from shoal.api.config import ServerConfig
from shoal.api.loads import LoadTracker
from shoal.api.metrics import PrometheusStatLogger
from shoal.api.response_store import ResponseStore
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
    responses: ResponseStore  # for previous_response_id


def server_state(request: Request) -> ServerState:
    return request.app.state.server
