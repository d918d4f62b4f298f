"""histoloop simulation: strategy campaigns on pre-annotated data.

The one package allowed to import both training and acquisition, because it replays
their round on data whose labels are known. :func:`run_campaign` runs a campaign in this
process (``histoloop simulate``); :mod:`histoloop.simulation.service` serves campaigns
as jobs over gRPC (``SimulationService``: start, progress, cancel).
"""

from histoloop.simulation.campaign import (
    DEFAULT_PCA,
    DEFAULT_QUERY_FRACTION,
    LOOP_SETTINGS,
    METRICS,
    RPC_MAX_ROUNDS,
    CampaignResult,
    SimulationConfig,
    SimulationData,
    campaign_id,
    default_strategies,
    label_schedule,
    load_anndata,
    parse_schedule,
    prepare_data,
    project_default_config,
    run_campaign,
)

__all__ = [
    "DEFAULT_PCA",
    "DEFAULT_QUERY_FRACTION",
    "LOOP_SETTINGS",
    "METRICS",
    "RPC_MAX_ROUNDS",
    "CampaignResult",
    "SimulationConfig",
    "SimulationData",
    "campaign_id",
    "default_strategies",
    "label_schedule",
    "load_anndata",
    "parse_schedule",
    "prepare_data",
    "project_default_config",
    "run_campaign",
]
