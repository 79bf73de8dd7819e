#!/usr/bin/env python3
"""Registers and verifies a person against a running `healthcode up`, knowing nothing of
the contracts but what server reflection tells it (a standard gRPC client, grpcio).

    pip install grpcio grpcio-reflection protobuf
    python3 integration-tests/smoke/reflection_smoke.py 127.0.0.1:50051 <token> data

The phone code is read from the log line of the local SMS sender, passed on stdin or as
the fourth argument when the script asks for it.
"""
import sys
import uuid

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "healthcode.identity.v1.IdentityService"


def main():
    addr, token = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(addr)
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName(SERVICE)
    metadata = [("authorization", f"Bearer {token}")]

    def call(method_name, body):
        method = service.FindMethodByName(method_name)
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        rpc = channel.unary_unary(
            f"/{SERVICE}/{method_name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        response = rpc(json_format.ParseDict(body, request_cls()), metadata=metadata, timeout=5)
        return json_format.MessageToDict(response)

    registered = call(
        "RegisterPerson",
        {
            "requestId": str(uuid.uuid4()),
            "document": {"type": "DOCUMENT_TYPE_RESIDENT_ID_CARD", "number": "11010519491231002X"},
            "name": "张三丰",
        },
    )
    person = registered["person"]
    print("registered", person["personId"])
    sent = call("SendPhoneCode", {"person": person, "phoneNumber": "13800138000"})
    print("code sent, expires", sent["expiresAt"])
    code = sys.argv[3] if len(sys.argv) > 3 else input("code from the log: ").strip()
    call("ConfirmPhoneCode", {"person": person, "code": code})
    # A PNG header: the local face provider scores a real image 92.
    face = call("SubmitFaceMatch", {"person": person, "liveImage": "iVBORw0KGgo="})
    print("verified:", face.get("verified", False), "level:", face.get("level"))
    assert face.get("verified") is True, face


if __name__ == "__main__":
    main()
