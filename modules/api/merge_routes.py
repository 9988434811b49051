"""`POST /sdapi/v1/merge-checkpoints`: the Checkpoint Merger as an API (SD.Next's route; A1111 has none).

The body has the fields of A1111's merger (run_modelmerger's arguments, as SD.Next names them); the
answer comes when the merge is done: the new file and its checkpoint title (already in
`/sdapi/v1/sd-models`). Refusals are 422 with the reason, a taken output name 409.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from modules.core.merge_service import MergeParams, MergeService
from modules.models.merge_names import CONFIG_SOURCES, FORMATS, INTERP_METHODS, MergeError, MergeInterrupted


class MergeCheckpointRequest(BaseModel):
    primary_model_name: str = Field(..., description="A: a checkpoint title, name or hash, as /sd-models lists them")
    secondary_model_name: Optional[str] = Field("", description="B (needed unless interp_method is No interpolation)")
    tertiary_model_name: Optional[str] = Field("", description="C (needed for Add difference)")
    interp_method: str = Field("Weighted sum", description=f"one of {', '.join(INTERP_METHODS)}: A, "
                               "A*(1-M)+B*M, A+(B-C)*M")
    multiplier: float = Field(0.3, description="M")
    save_as_half: bool = Field(False, description="save float32 tensors as float16")
    custom_name: Optional[str] = Field("", description="file name without folder; empty: A1111's name from the "
                                       "models and M")
    checkpoint_format: str = Field("safetensors", description=f"one of {', '.join(FORMATS)}")
    config_source: Union[int, str] = Field(0, description=f"copy the sidecar .yaml from: index or label of "
                                           f"{', '.join(CONFIG_SOURCES)}")
    bake_in_vae: Optional[str] = Field("None", description="a VAE name (/sd-vae) whose weights replace the VAE")
    discard_weights: Optional[str] = Field("", description="regex: matching tensors are left out")
    save_metadata: bool = Field(True, description="write metadata into the safetensors header")
    add_merge_recipe: bool = Field(True, description="sd_merge_recipe and sd_merge_models, as A1111 writes them")
    copy_metadata_fields: bool = Field(True, description="copy the sources' metadata (A, then B, then C)")
    metadata_json: Optional[str] = Field("", description="a JSON object of more metadata fields")


class MergeCheckpointResponse(BaseModel):
    filename: str = Field(description="the merged checkpoint file")
    title: str = Field(description="its checkpoint title, usable as sd_model_checkpoint")
    info: str = Field(description="what was done")


def add_merge_routes(api: Any, *, bad_request: Callable[..., Exception], wait_for: Callable[..., Any]) -> None:
    """On `api` (routes.Api), with its helpers: `bad_request(detail, status)` and `wait_for(job, request, queue)`."""
    @api.router.post("/merge-checkpoints", response_model=MergeCheckpointResponse)
    async def merge_checkpoints(req: MergeCheckpointRequest, request: Request) -> MergeCheckpointResponse:
        service = MergeService(api.models, api.generation.queue)
        values = {k: ("" if v is None else v) for k, v in req.model_dump().items()}
        params = MergeParams(**values)
        try:
            job = await run_in_threadpool(lambda: service.submit(params, owner=api.caller(request).name))
            result = await wait_for(job, request, api.generation.queue)
        except MergeError as err:
            raise bad_request(str(err), 409 if "already exists" in str(err) else 422) from None
        except MergeInterrupted as err:
            raise bad_request(str(err), 409) from None
        return MergeCheckpointResponse(filename=result.filename, title=result.title, info=result.message)
