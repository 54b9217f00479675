"""One source of truth for mode names and request fields: the proto, the core's config, the SDK and
the HTTP gateway agree."""

from __future__ import annotations

import dataclasses

from clasp.config import MODES, REQUEST_FIELDS, ClaspConfig
from clasp_serve.v1 import clasp_pb2 as pb
from clients import sdk
from decoder_service import convert
from http_gateway import protocol


def test_mode_names_agree_everywhere():
    assert tuple(sdk.MODES) == tuple(protocol.MODES) == tuple(convert.MODES.values()) == MODES
    assert set(convert.MODES) == {v.number for v in pb.SpeculationMode.DESCRIPTOR.values if v.number}


def test_request_fields_are_config_fields_and_proto_fields():
    config_fields = {f.name for f in dataclasses.fields(ClaspConfig)}
    proto_fields = set(pb.Speculation.DESCRIPTOR.fields_by_name)
    assert set(REQUEST_FIELDS) <= config_fields
    assert set(REQUEST_FIELDS) == proto_fields
    assert set(REQUEST_FIELDS) == set(protocol.Speculation.model_fields)
