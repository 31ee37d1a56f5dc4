"""The app's shared things, for the routes: its settings, its model registry, its metrics.

Routes read these from their request rather than declaring them with Depends(): FastAPI runs a
plain-def dependency in its thread pool, a thread hop per request.
"""

from __future__ import annotations

from fastapi import Request

from mmoe.service.metrics import ServiceMetrics
from mmoe.service.registry import ModelRegistry
from mmoe.service.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics
