"""
The OpenAPI 3.1 description of the MIMI gateway, served without
authentication at C{GET /mimi/openapi.json} on the outward listener.

It describes both interfaces in one document:

- the internal interface (tag C{internal}): every route of
  L{fedserver_mimi.gateway_api.GatewayAPI} under C{/mimi/}, for
  application servers, with the bearer token;
- the external interface (tag C{external}): the component's RPCs as
  C{POST /federation/mimi/{rpc}}, served on the inward listener to other
  gateways that authenticate with mutual TLS (the paths carry their own
  C{servers} entry, since that listener is another address).

Every refusal is the labelled JSON C{{"code", "label", "message"[, "data"]}}
with C{code} equal to the HTTP status; each documented response lists the
labels it can carry, as an C{enum} of C{label} and in its description.  The
document is plain data built here, so that it is installed with the plugin
and cannot drift from the code unnoticed (tests compare it to the router and
fuzz the running server with it).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

#: the largest MLS message the gateway takes, in bytes (groupInfo, ratchetTree, commits, proposals, Welcomes)
MAX_MESSAGE_BYTES = 1 << 20
#: the largest KeyPackage, in bytes
MAX_KEY_PACKAGE_BYTES = 64 * 1024
#: the largest client handle, in bytes (L{fedserver_mimi.gateway.GatewayLimits.handle_bytes})
MAX_HANDLE_BYTES = 1024

UUID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
#: standard base64 with padding, exactly what C{base64.b64decode(validate=True)} takes
BASE64_PATTERN = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
GROUP_ID_PATTERN = "^[A-Za-z0-9_-]+$"
#: no control characters (Unicode category Cc)
TEXT_PATTERN = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$"
#: a lower-case DNS name (L{fedserver.config.is_domain_name}), with C{maxLength} 253
DOMAIN_PATTERN = "^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"


def _base64_length(data_bytes: int) -> int:
    return (data_bytes + 2) // 3 * 4


#: every label, what it means
LABELS: Mapping[str, str] = {
    # the gateway
    "bad-request": "the request has the wrong shape: a missing or unknown key, a value of the wrong type or "
                   "out of range, an unknown query parameter, a path id that is not an id",
    "missing-token": "no Authorization header, or one that is not 'Bearer TOKEN'",
    "invalid-token": "the bearer token is neither an application's nor the admin's",
    "access-denied": "the token does not act for the application in the path, or the admin token was used "
                     "where an application's is needed (and the reverse); on the external interface, a call "
                     "relayed through a relay hub (the gateway keys claims and Welcomes on the calling domain)",
    "not-found": "there is no such application, client, queue or group (for this application); an application "
                 "no longer declared in the configuration (retired) is not found either",
    "no-endpoint": "no route has this path",
    "method-not-allowed": "the route takes another method",
    "identity-mismatch": "the other application uses another identity configuration",
    "identity-provider-missing": "the application's identity provider is no longer configured",
    "token-in-use": "the configuration declares an application with the token of another stored application "
                    "(the gateway refuses every request until the operator fixes it)",
    "federation-disabled": "the application does not federate (federate = false)",
    "client-handle-exists": "another client of the application has this handle (its id is data.clientId)",
    "queue-exists": "the client has a queue for this version, suite and label (its id is data.queueId)",
    "invalid-key-package": "a KeyPackage does not parse (400) or its signatures do not verify (422)",
    "key-package-mismatch": "a KeyPackage or Welcome is for another protocol version, cipher suite or client",
    "key-package-expired": "a KeyPackage's lifetime has ended",
    "invalid-credential": "the identity provider does not accept a KeyPackage's credential",
    "key-package-exists": "a KeyPackage is already filed in another queue",
    "too-many-key-packages": "the queue would hold more KeyPackages than key_packages_per_queue",
    "no-key-package": "the client has no such queue, or no valid KeyPackage left in it",
    "too-many-claims": "the calling domain holds claims_per_peer_per_queue unconsumed KeyPackages of the queue "
                       "(or as many claims of its final key) already; they are released after claim_ttl",
    "too-many-welcomes": "a client the Welcome is for keeps welcomes_per_client Welcome messages already "
                         "(data.clientId)",
    "claim-conflict": "a concurrent claim took the KeyPackage; retry",
    "invalid-mls-message": "an MLS message does not parse",
    "bad-epoch": "a GroupInfo is for the wrong epoch (a new group starts at 0; a commit's at the next epoch)",
    "group-exists": "a group with this id exists already",
    "wrong-content-type": "the handshake message is not a proposal (or a commit) as the route needs",
    "wrong-group": "the handshake message is for another group",
    "stale-epoch": "the message is not for the group's current epoch (data.currentEpoch)",
    "too-many-proposals": "the epoch already has proposals_per_epoch proposals",
    "unknown-key-package": "a Welcome names KeyPackages that were not claimed through this gateway by the "
                           "committing application's clients (or by the calling gateway), or that a Welcome used "
                           "already (data.keyPackageRefs)",
    # fedserver's own (docs/errors.md)
    "request-too-large": "the request body is larger than [limits] max_body_bytes",
    "invalid-json": "the body of a federated call is not JSON",
    "invalid-endpoint": "a federated call with another method than POST, or with a query string",
    "unknown-component": "this backend has no such component",
    "no-client-certificate": "the peer presented no client certificate",
    "certificate-parse-error": "the peer's client certificate cannot be read or names nobody",
    "authentication-failure": "the peer's client certificate is not accepted",
    "no-origin-domain": "the Wire-Origin-Domain header is missing",
    "validation-error": "the claimed origin domain is not served by the certificate's names",
    "federation-denied": "an authorizer refused the call",
    "invalid-domain": "discovery does not know the domain",
    "discovery-failure": "discovery found no target for the domain",
    "federation-connection-refused": "the other backend cannot be reached",
    "federation-tls-error": "TLS with the other backend failed",
    "federation-timeout": "the other backend did not answer in time",
    "federation-remote-error": "the other backend answered with an error, which is under inner",
    "federation-unexpected-body": "the other gateway answered 2xx with a body that is not what the RPC returns",
    "federation-not-available": "fedserver is still starting",
}

Errors = Dict[int, List[str]]


def _merge(*parts: Mapping[int, Iterable[str]]) -> Errors:
    merged: Dict[int, List[str]] = {}
    for part in parts:
        for status, labels in part.items():
            known = merged.setdefault(status, [])
            known.extend(label for label in labels if label not in known)
    return merged


#: unknown query parameters, a query parameter given twice, a query string that is not UTF-8
QUERY: Errors = {400: ["bad-request"]}
#: recording the declared applications, which every request may do first
STARTUP: Errors = {503: ["token-in-use"]}
AUTH: Errors = _merge({401: ["missing-token", "invalid-token"]}, STARTUP)
#: a route under /apps/{appId}
APP: Errors = _merge(AUTH, {400: ["bad-request"], 403: ["access-denied"]})
BODY: Errors = {400: ["bad-request"], 413: ["request-too-large"]}
PROVIDER: Errors = {503: ["identity-provider-missing"]}
#: another application on this gateway (app=ID)
OTHER_APP: Errors = {404: ["not-found"], 409: ["identity-mismatch"]}
#: a call to another gateway (domain=D)
REMOTE: Errors = {
    400: ["federation-denied", "discovery-failure"],
    403: ["federation-disabled"],
    422: ["invalid-domain"],
    500: ["federation-not-available"],
    504: ["federation-timeout"],
    521: ["federation-connection-refused"],
    525: ["federation-tls-error"],
    533: ["federation-remote-error", "federation-unexpected-body"],
}
#: a call relayed through a relay hub, which the gateway's RPCs refuse
RELAYED: Errors = {403: ["access-denied"]}
#: refusals of the inward listener before the gateway sees a call
PIPELINE: Errors = {
    400: ["invalid-json", "federation-denied", "discovery-failure"],
    403: ["invalid-endpoint", "unknown-component", "no-client-certificate", "certificate-parse-error",
          "authentication-failure", "no-origin-domain", "validation-error"],
    413: ["request-too-large"],
    422: ["invalid-domain"],
    504: ["federation-timeout"],
}

STATUS_TEXT = {
    400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found", 409: "Conflict",
    413: "Request too large", 422: "Unprocessable", 429: "Too many", 500: "Not available yet", 503: "Unavailable",
    504: "Timeout", 521: "Peer unreachable", 525: "TLS failure", 533: "Peer error",
}


def _ref(name: str) -> Dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _text(maximum: int, minimum: int = 1, description: str = "") -> Dict[str, Any]:
    schema: Dict[str, Any] = {"type": "string", "minLength": minimum, "maxLength": maximum, "pattern": TEXT_PATTERN}
    if description:
        schema["description"] = description
    return schema


def _base64(maximum_bytes: int, description: str) -> Dict[str, Any]:
    return {
        "type": "string", "contentEncoding": "base64", "minLength": 4, "maxLength": _base64_length(maximum_bytes),
        "pattern": BASE64_PATTERN, "description": f"{description} (standard base64 with padding; 1 to "
                                                  f"{maximum_bytes} bytes)",
    }


def _integer(minimum: int, maximum: int, description: str = "") -> Dict[str, Any]:
    schema: Dict[str, Any] = {"type": "integer", "minimum": minimum, "maximum": maximum}
    if description:
        schema["description"] = description
    return schema


def _object(properties: Mapping[str, Any], required: Sequence[str] = (), *, strict: bool = False,
            description: str = "") -> Dict[str, Any]:
    schema: Dict[str, Any] = {"type": "object", "properties": dict(properties)}
    if required:
        schema["required"] = list(required)
    if strict:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


UUID = {"type": "string", "format": "uuid", "pattern": UUID_PATTERN, "minLength": 36, "maxLength": 36}
DOMAIN = {"type": "string", "minLength": 1, "maxLength": 253, "pattern": DOMAIN_PATTERN}
GROUP_ID = {"type": "string", "minLength": 1, "maxLength": 344, "pattern": GROUP_ID_PATTERN,
            "description": "an MLS group id as canonical base64url without padding"}
VERSION = _integer(1, 0xFFFF, "the MLS protocol version (1: mls10)")
SUITE = _integer(1, 0xFFFF, "the MLS cipher suite")
APP_LABEL = _text(64, 0, "the queue's label; empty (the default) for none")
TAG = _text(256)
EPOCH = _integer(0, 2**63 - 1)
TRUNCATED = {"type": "boolean", "description": "true when rows were left out (at most 1000 rows, and no more once "
                                               "their messages hold 8 MiB): ask again from where this one ended"}


def _schemas() -> Dict[str, Any]:
    return {
        "Error": _object(
            {
                "code": {"type": "integer", "minimum": 400, "maximum": 599, "description": "the HTTP status"},
                "label": {"type": "string", "enum": sorted(LABELS)},
                "message": {"type": "string", "description": "what was refused and why, for a person"},
                "data": {"type": "object", "description": "machine-readable context (e.g. currentEpoch, "
                                                          "clientId, queueId, or the domain and path called)"},
                "inner": {"description": "federation-remote-error: the other backend's error, unchanged"},
            },
            ["code", "label", "message"],
            description="A refusal. code is the HTTP status; label is machine-readable.",
        ),
        "IdentityConfiguration": _object(
            {"type": {"type": "string"}, "parameters": {"type": "object"}}, ["type"],
            description="An identity provider's type and parameters; applications interoperate only when "
                        "theirs are equal.",
        ),
        "App": _object(
            {
                "appId": UUID, "name": _text(128), "federate": {"type": "boolean"},
                "declared": {"type": "boolean", "description": "declared in the configuration (not created "
                                                               "through the API)"},
                "identityProvider": {"type": "string"},
                "identityConfiguration": _ref("IdentityConfiguration"),
            },
            ["appId", "name", "federate", "declared", "identityProvider", "identityConfiguration"],
        ),
        "CreatedApp": {
            "allOf": [_ref("App"), _object({"token": {"type": "string", "description": "the application's bearer "
                                                                                      "token, shown only once"}},
                                           ["token"])],
        },
        "AppSummary": _object(
            {"appId": UUID, "name": _text(128), "identityConfiguration": _ref("IdentityConfiguration")},
            ["appId", "name", "identityConfiguration"],
            description="A federating application as another gateway lists it (rebuilt from these fields only; "
                        "identityConfiguration from its type and parameters, at most 16384 characters of JSON).",
        ),
        "AppList": _object({"apps": {"type": "array", "items": {"anyOf": [_ref("App"), _ref("AppSummary")]}}},
                           ["apps"]),
        "Client": _object(
            {"clientId": UUID, "clientIdentity": _base64(MAX_HANDLE_BYTES, "the client handle"),
             "tags": {"type": "array", "items": {"type": "string"}}},
            ["clientId", "clientIdentity", "tags"],
        ),
        "ClientList": _object({"identities": {"type": "array", "items": _ref("Client")}}, ["identities"]),
        "Queue": _object(
            {"queueId": UUID, "protocolVersion": VERSION, "cipherSuite": SUITE, "appLabel": {"type": "string"},
             "keyPackagesInPool": {"type": "integer", "minimum": 0}, "hasFinalKey": {"type": "boolean"}},
            ["queueId", "protocolVersion", "cipherSuite", "appLabel", "keyPackagesInPool", "hasFinalKey"],
        ),
        "ClaimedKeyPackage": _object(
            {"keyPackage": _base64(MAX_KEY_PACKAGE_BYTES, "the KeyPackage"),
             "isFinalKey": {"type": "boolean", "description": "the queue's final key (reused by every claim)"}},
            ["keyPackage", "isFinalKey"],
        ),
        "GroupInfo": _object(
            {"groupId": GROUP_ID, "epoch": EPOCH, "groupInfo": _base64(MAX_MESSAGE_BYTES, "the GroupInfo"),
             "ratchetTree": _base64(MAX_MESSAGE_BYTES, "the ratchet tree")},
            ["groupId", "epoch", "groupInfo"],
        ),
    }


def _error_response(status: int, labels: Sequence[str]) -> Dict[str, Any]:
    lines = "; ".join(f"`{label}`: {LABELS[label]}" for label in labels)
    return {
        "description": f"{STATUS_TEXT.get(status, 'Refused')}. {lines}.",
        "content": {
            "application/json": {
                "schema": {
                    "allOf": [
                        _ref("Error"),
                        {"properties": {"code": {"const": status}, "label": {"enum": list(labels)}}},
                    ],
                },
            },
        },
    }


def _responses(status: int, description: str, schema: Mapping[str, Any], errors: Errors) -> Dict[str, Any]:
    responses: Dict[str, Any] = {
        str(status): {"description": description, "content": {"application/json": {"schema": dict(schema)}}},
    }
    for code in sorted(errors):
        responses[str(code)] = _error_response(code, errors[code])
    return responses


def _query(name: str, schema: Mapping[str, Any], description: str, *, required: bool = False) -> Dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": dict(schema)}


def _path(name: str, schema: Mapping[str, Any], description: str) -> Dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": dict(schema)}


APP_ID = _path("appId", UUID, "the application the token acts for")
CLIENT_ID = _path("clientId", UUID, "a client of the application")
QUEUE_ID = _path("queueId", UUID, "a key queue of the client")
GROUP = _path("groupId", GROUP_ID, "an MLS group id, base64url without padding")
REQUEST_ID = {
    "name": "Request-Id", "in": "header", "required": False,
    "description": "an id for the server's log lines, used when it has 1 to 128 of the characters "
                   "A-Z a-z 0-9 _ . : @ / + = -; any other value is ignored (the server makes up an id)",
    "schema": {"type": "string"},
}
DOMAIN_QUERY = _query(
    "domain", DOMAIN, "another gateway's backend domain: the request goes to its external interface for this "
                      "application (which must federate); this gateway's own domain means here",
)
APP_QUERY = _query(
    "app", UUID, "another application (on this gateway, or with domain= on that one) with the same identity "
                 "configuration; required with a domain other than this gateway's",
)


def _operation(
    operation_id: str,
    summary: str,
    responses: Dict[str, Any],
    *,
    parameters: Sequence[Mapping[str, Any]] = (),
    body: Optional[Mapping[str, Any]] = None,
    description: str = "",
    tag: str = "internal",
    security: Optional[List[Dict[str, List[str]]]] = None,
) -> Dict[str, Any]:
    operation: Dict[str, Any] = {"operationId": operation_id, "tags": [tag], "summary": summary}
    if description:
        operation["description"] = description
    operation["parameters"] = [copy.deepcopy(dict(p)) for p in [*parameters, REQUEST_ID]]
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": dict(body)}}}
    operation["responses"] = responses
    if security is not None:
        operation["security"] = security
    return operation


def _internal_paths() -> Dict[str, Any]:
    client_path = "/mimi/apps/{appId}/clients/{clientId}"
    group_path = "/mimi/apps/{appId}/groups/{groupId}"
    app_params = [APP_ID]
    client_params = [APP_ID, CLIENT_ID]
    group_params = [APP_ID, GROUP]
    handle = _base64(MAX_HANDLE_BYTES, "the client handle, unique within the application")
    tags = {"type": "array", "maxItems": 1000, "items": TAG,
            "description": "tags of 1 to 256 characters; at most tags_per_client (default 64)"}
    key_package = _base64(MAX_KEY_PACKAGE_BYTES, "a KeyPackage, bare or as an MLSMessage")
    mls = _base64(MAX_MESSAGE_BYTES, "an MLSMessage")
    return {
        "/mimi/openapi.json": {
            "get": _operation(
                "openapi", "This document",
                _responses(200, "The OpenAPI description of the gateway.", {"type": "object"}, QUERY),
                security=[],
            ),
        },
        "/mimi/apps": {
            "get": _operation(
                "listApps", "List applications",
                _responses(200, "The admin token sees every application; an application's token, itself. With "
                                "domain=, the federating applications of that gateway.",
                           _ref("AppList"), _merge(QUERY, AUTH, {400: ["bad-request"], 403: ["access-denied"]},
                                                   PROVIDER, REMOTE)),
                parameters=[_query("domain", DOMAIN, "list another gateway's federating applications (needs an "
                                                     "application's token)")],
            ),
            "post": _operation(
                "createApp", "Create an application (admin token)",
                _responses(201, "The application, with its new token.", _ref("CreatedApp"),
                           _merge(QUERY, AUTH, BODY, {403: ["access-denied"]})),
                body=_object(
                    {"name": _text(128), "identityProvider": _text(128, description="an [identity_providers.NAME]"),
                     "federate": {"type": "boolean", "default": True}},
                    ["name", "identityProvider"], strict=True,
                ),
            ),
        },
        "/mimi/apps/{appId}": {
            "get": _operation(
                "getApp", "The application",
                _responses(200, "The application.", _ref("App"), _merge(QUERY, APP, PROVIDER)),
                parameters=app_params,
            ),
        },
        "/mimi/apps/{appId}/clients": {
            "post": _operation(
                "registerClient", "Register a client",
                _responses(201, "The new client's id.", _object({"clientId": UUID}, ["clientId"]),
                           _merge(QUERY, APP, BODY, {409: ["client-handle-exists"]})),
                parameters=app_params,
                body=_object({"clientHandle": handle, "tags": tags}, ["clientHandle"], strict=True),
            ),
            "get": _operation(
                "listClients", "Clients with a tag",
                _responses(200, "At most 1000 clients with the tag.", _ref("ClientList"),
                           _merge(QUERY, APP, OTHER_APP, PROVIDER, REMOTE)),
                parameters=[*app_params, _query("tag", TAG, "the tag", required=True), DOMAIN_QUERY, APP_QUERY],
            ),
        },
        client_path: {
            "get": _operation(
                "getClient", "A client",
                _responses(200, "The client.", _ref("Client"), _merge(QUERY, APP, {404: ["not-found"]})),
                parameters=client_params,
            ),
            "patch": _operation(
                "patchClient", "Change a client's handle or tags",
                _responses(200, "The client as changed.", _ref("Client"),
                           _merge(QUERY, APP, BODY, {404: ["not-found"], 409: ["client-handle-exists"]})),
                parameters=client_params,
                body=_object({"clientHandle": handle, "tagsToAdd": tags, "tagsToRemove": tags}, strict=True),
                description="Tags are removed, then added; a client with more than tags_per_client tags "
                            "afterwards is refused (bad-request).",
            ),
            "delete": _operation(
                "deleteClient", "Delete a client",
                _responses(200, "Deleted, with its tags, queues, KeyPackages and Welcome messages.",
                           _object({}, strict=True), _merge(QUERY, APP, {404: ["not-found"]})),
                parameters=client_params,
            ),
        },
        f"{client_path}/queues": {
            "post": _operation(
                "createQueue", "Create a key queue",
                _responses(201, "The new queue's id.", _object({"queueId": UUID}, ["queueId"]),
                           _merge(QUERY, APP, BODY, {404: ["not-found"], 409: ["queue-exists"]})),
                parameters=client_params,
                body=_object({"protocolVersion": VERSION, "cipherSuite": SUITE, "appLabel": APP_LABEL},
                             ["protocolVersion", "cipherSuite"], strict=True),
            ),
            "get": _operation(
                "listQueues", "A client's key queues",
                _responses(200, "The queues, each with the number of KeyPackages available.",
                           _object({"queues": {"type": "array", "items": _ref("Queue")}}, ["queues"]),
                           _merge(QUERY, APP, {404: ["not-found"]})),
                parameters=client_params,
            ),
        },
        f"{client_path}/queues/{{queueId}}": {
            "patch": _operation(
                "fillQueue", "Upload KeyPackages to a queue",
                _responses(200, "How many KeyPackages are available now.",
                           _object({"keyPackagesInPool": {"type": "integer", "minimum": 0}}, ["keyPackagesInPool"]),
                           _merge(QUERY, APP, BODY, PROVIDER, {
                               400: ["invalid-key-package", "too-many-key-packages"],
                               404: ["not-found"],
                               409: ["key-package-exists"],
                               422: ["invalid-key-package", "key-package-mismatch", "key-package-expired",
                                     "invalid-credential"],
                           })),
                parameters=[*client_params, QUEUE_ID],
                body=_object(
                    {"keyPackages": {"type": "array", "maxItems": 1000, "items": key_package,
                                     "description": "at most key_packages_per_upload (default 100)"},
                     "isReset": {"type": "boolean", "default": False,
                                 "description": "first drop the KeyPackages nobody has claimed"},
                     "finalKey": key_package},
                    strict=True,
                ),
                description="Each KeyPackage must parse, have valid signatures, be for the queue's version and "
                            "suite, not have expired, and carry a credential that the application's identity "
                            "provider accepts and whose client handle is the client's.",
            ),
        },
        f"{client_path}/keyPackage": {
            "get": _operation(
                "claimKeyPackage", "Claim a KeyPackage of a client",
                _responses(200, "The KeyPackage, now held for the receiver.", _ref("ClaimedKeyPackage"),
                           _merge(QUERY, APP, OTHER_APP, PROVIDER, REMOTE,
                                  {404: ["no-key-package"], 503: ["claim-conflict"]})),
                parameters=[
                    *client_params,
                    _query("protocolVersion", VERSION, "the protocol version", required=True),
                    _query("cipherSuite", SUITE, "the cipher suite", required=True),
                    _query("appLabel", APP_LABEL, "the queue's label"),
                    _query("receiverClientId", UUID, "the caller's client that will use the KeyPackage",
                           required=True),
                    DOMAIN_QUERY, APP_QUERY,
                ],
                description="clientId is a client of the application named by app= (default: the caller's). "
                            "A receiver that already holds a valid KeyPackage of the client gets it again.",
            ),
        },
        f"{client_path}/welcome-msgs": {
            "get": _operation(
                "listWelcomes", "A client's Welcome messages",
                _responses(200, "At most 1000 Welcome messages after since, and no more once they hold 8 MiB; "
                                "with truncated, ask again with since= the last id.",
                           _object({"welcomeMessages": {"type": "array", "items": _object(
                               {"id": {"type": "integer", "minimum": 1}, "domain": DOMAIN, "groupId": GROUP_ID,
                                "epoch": EPOCH, "welcomePacket": mls},
                               ["id", "domain", "groupId", "epoch", "welcomePacket"])}, "truncated": TRUNCATED},
                                   ["welcomeMessages", "truncated"]),
                           _merge(QUERY, APP, {404: ["not-found"]})),
                parameters=[*client_params, _query("since", _integer(0, 2**62), "only messages with a larger id")],
            ),
        },
        "/mimi/apps/{appId}/groups": {
            "put": _operation(
                "createGroup", "Create a group at epoch 0",
                _responses(201, "The group's id (from the GroupInfo) and epoch.",
                           _object({"groupId": GROUP_ID, "epoch": {"const": 0}}, ["groupId", "epoch"]),
                           _merge(QUERY, APP, BODY, {400: ["invalid-mls-message"], 409: ["group-exists"],
                                                     422: ["bad-epoch"]})),
                parameters=app_params,
                body=_object({"groupInfo": mls, "ratchetTree": _base64(MAX_MESSAGE_BYTES, "the ratchet tree")},
                             ["groupInfo"], strict=True),
            ),
        },
        f"{group_path}/group-info": {
            "get": _operation(
                "getGroupInfo", "A group's current GroupInfo",
                _responses(200, "The group's epoch and GroupInfo.", _ref("GroupInfo"),
                           _merge(QUERY, APP, {404: ["not-found"]}, OTHER_APP, PROVIDER, REMOTE)),
                parameters=[*group_params, DOMAIN_QUERY, APP_QUERY],
            ),
        },
        f"{group_path}/proposals": {
            "put": _operation(
                "addProposal", "File a proposal for the current epoch",
                _responses(201, "The epoch the proposal is filed for.", _object({"epoch": EPOCH}, ["epoch"]),
                           _merge(QUERY, APP, BODY, {
                               400: ["invalid-mls-message", "too-many-proposals"], 404: ["not-found"],
                               409: ["stale-epoch"], 422: ["wrong-content-type", "wrong-group"],
                           })),
                parameters=group_params,
                body=_object({"proposal": mls}, ["proposal"], strict=True),
            ),
            "get": _operation(
                "listProposals", "The current epoch's proposals",
                _responses(200, "The current epoch and its proposals, oldest first, from the start-th; at most "
                                "1000, and no more once they hold 8 MiB: with truncated, ask again with start= "
                                "the number received so far (while the epoch is the same).",
                           _object({"epoch": EPOCH, "proposals": {"type": "array", "items": mls},
                                    "truncated": TRUNCATED},
                                   ["epoch", "proposals", "truncated"]),
                           _merge(QUERY, APP, {404: ["not-found"]})),
                parameters=[*group_params, _query("start", _integer(0, 2**31 - 1),
                                                  "how many of the epoch's proposals to skip (default 0)")],
            ),
        },
        f"{group_path}/epochs": {
            "put": _operation(
                "commit", "Commit: move the group to the next epoch",
                _responses(
                    201, "The new epoch; the clients welcomed, here and on other gateways; the gateways the "
                         "Welcome is queued for (not reached yet: the durable outbound queue retries, with the "
                         "error of the last attempt if one was made); the gateways that refused it for good.",
                    _object({
                        "epoch": EPOCH,
                        "welcomed": {"type": "array", "items": _object({"domain": DOMAIN, "clientId": {
                            "type": "string"}}, ["domain", "clientId"])},
                        "queued": {"type": "array", "items": _object({"domain": DOMAIN, "error": _ref("Error")},
                                                                     ["domain"])},
                        "failed": {"type": "array", "items": _object({"domain": DOMAIN, "error": _ref("Error")},
                                                                     ["domain", "error"])},
                    }, ["epoch", "welcomed", "queued", "failed"]),
                    _merge(QUERY, APP, BODY, {
                        400: ["invalid-mls-message"], 404: ["not-found"], 409: ["stale-epoch"],
                        422: ["wrong-content-type", "wrong-group", "bad-epoch", "key-package-mismatch",
                              "unknown-key-package"],
                        429: ["too-many-welcomes"],
                    }),
                ),
                parameters=group_params,
                body=_object(
                    {"commitPacket": mls, "groupInfo": _base64(MAX_MESSAGE_BYTES, "the GroupInfo of the next epoch"),
                     "welcomePacket": _base64(MAX_MESSAGE_BYTES, "a Welcome for the KeyPackages claimed for it"),
                     "ratchetTree": _base64(MAX_MESSAGE_BYTES, "the ratchet tree")},
                    ["commitPacket"], strict=True,
                ),
            ),
        },
        f"{group_path}/control-msgs": {
            "get": _operation(
                "listCommits", "A group's commits",
                _responses(200, "The current epoch and at most 1000 commits, by epoch, and no more once they hold "
                                "8 MiB; with truncated, ask again with startEpochId= the last epoch + 1.",
                           _object({"epoch": EPOCH, "messages": {"type": "array", "items": _object(
                               {"epoch": EPOCH, "commitPacket": mls}, ["epoch", "commitPacket"])},
                                    "truncated": TRUNCATED},
                                   ["epoch", "messages", "truncated"]),
                           _merge(QUERY, APP, {404: ["not-found"]})),
                parameters=[*group_params,
                            _query("startEpochId", EPOCH, "the first epoch (default 0)"),
                            _query("endEpochId", EPOCH, "the last epoch (default: the one before the current); "
                                                        "not before startEpochId")],
            ),
        },
    }


def _external_paths() -> Dict[str, Any]:
    requester = _object(
        {"appId": {"type": "string", "description": "the requesting application's id"},
         "identityConfiguration": {"description": "the requesting application's identity configuration; it must "
                                                  "equal the target application's"}},
        ["appId", "identityConfiguration"],
        description="The application the calling gateway acts for.",
    )
    origin = {
        "name": "Wire-Origin-Domain", "in": "header", "required": True, "schema": DOMAIN,
        "description": "the calling backend domain; the mtls authenticator checks through discovery that the "
                       "client certificate serves it",
    }
    servers = [{
        "url": "https://{inward}",
        "description": "the inward listener, to other backends authenticated by mutual TLS",
        "variables": {"inward": {"default": "fed.example.com:443",
                                 "description": "the infrastructure domain and port of the inward listener"}},
    }]
    target = _merge(PIPELINE, {400: ["bad-request"], 404: ["not-found"], 409: ["identity-mismatch"]}, PROVIDER)

    def rpc(name: str, summary: str, body: Dict[str, Any], answer: Mapping[str, Any], errors: Errors,
            description: str) -> Dict[str, Any]:
        operation = _operation(
            f"rpc-{name}", summary, _responses(200, "The answer.", answer, _merge(errors, RELAYED, STARTUP)),
            parameters=[origin],
            body=body, tag="external", security=[{"peerMutualTLS": []}],
            description=f"{description} Served on the inward listener to authenticated peers; keys the gateway "
                        "does not know are ignored (a newer peer may add some). A call relayed through a relay "
                        "hub (with Fedserver-Relay-Origin) is refused: 403 access-denied.",
        )
        return {"servers": copy.deepcopy(servers), "post": operation}

    return {
        "/federation/mimi/list-apps": rpc(
            "list-apps", "The applications that federate",
            _object({"requester": requester}),
            _object({"apps": {"type": "array", "items": _ref("AppSummary")}}, ["apps"]),
            _merge(PIPELINE, {400: ["bad-request"]}),
            "Any JSON body is accepted.",
        ),
        "/federation/mimi/list-clients": rpc(
            "list-clients", "Clients of an application with a tag",
            _object({"appId": UUID, "tag": TAG, "requester": requester}, ["appId", "tag", "requester"]),
            _ref("ClientList"), target, "At most 1000 clients.",
        ),
        "/federation/mimi/claim-key-package": rpc(
            "claim-key-package", "Claim a KeyPackage",
            _object(
                {"appId": UUID, "clientId": UUID, "protocolVersion": VERSION, "cipherSuite": SUITE,
                 "appLabel": APP_LABEL, "receiverClientId": UUID, "requester": requester},
                ["appId", "clientId", "protocolVersion", "cipherSuite", "receiverClientId", "requester"],
            ),
            _ref("ClaimedKeyPackage"),
            _merge(target, {404: ["no-key-package"], 429: ["too-many-claims"], 503: ["claim-conflict"]}),
            "The receiver is receiverClientId at the calling domain. The calling domain holds at most "
            "claims_per_peer_per_queue unconsumed KeyPackages of one queue (and as many claims of its final key); "
            "claims that no Welcome used within claim_ttl are released.",
        ),
        "/federation/mimi/group-info": rpc(
            "group-info", "A group's current GroupInfo",
            _object({"appId": UUID, "groupId": GROUP_ID, "requester": requester},
                    ["appId", "groupId", "requester"]),
            _ref("GroupInfo"), target, "",
        ),
        "/federation/mimi/deliver-welcome": rpc(
            "deliver-welcome", "Deliver a Welcome",
            _object({"groupId": GROUP_ID, "epoch": _integer(1, 2**63 - 1),
                     "welcome": _base64(MAX_MESSAGE_BYTES, "the Welcome, an MLSMessage")},
                    ["groupId", "epoch", "welcome"]),
            _object({"welcomed": {"type": "array", "items": UUID}}, ["welcomed"]),
            _merge(PIPELINE, {400: ["bad-request", "invalid-mls-message"], 404: ["not-found"],
                              422: ["unknown-key-package"], 429: ["too-many-welcomes"]}),
            "For KeyPackages the calling gateway claimed here: each is consumed (a claim of a final key is used up) "
            "and the Welcome filed for its client. not-found: every one is of an application that is retired.",
        ),
    }


DESCRIPTION = """\
The MIMI gateway of fedserver (the `mimi-gateway` component, which must be configured as
`[components.mimi]`).

**Internal interface** (tag `internal`): the HTTP API application servers use, under `/mimi/` on
fedserver's outward listener. Every route but this document needs `Authorization: Bearer TOKEN`:
an application's token (`[[components.mimi.apps]] token_file`, or the one `POST /mimi/apps`
returns) acts for that application only, whose id must be the `appId` of the path; the admin token
(`admin_token_file`) lists and creates applications. Queries go in the query string; each query
parameter may be given once, and an unknown one is refused. Request bodies are JSON objects in which
an unknown key is refused. An integer must be written as one (`1`, not `1.0`), in bodies and queries
alike. A path that no route has is `404 no-endpoint`; a route used with another
method is `405 method-not-allowed`.

**External interface** (tag `external`): the RPCs other gateways call as
`POST /federation/mimi/{rpc}` on fedserver's inward listener, through the federation pipeline: the
peer authenticates with mutual TLS, claims its backend domain in `Wire-Origin-Domain`, and must be
allowed by the authorizers. Each body names the requesting application (`requester`).

Every refusal is JSON `{"code", "label", "message"[, "data"][, "inner"]}` with `code` equal to the
HTTP status; each response below lists the labels it can carry.
"""


def openapi_document() -> Dict[str, Any]:
    """The gateway's OpenAPI 3.1 document (a fresh copy each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fedserver MIMI gateway",
            "version": "1",
            "description": DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": "/", "description": "fedserver's outward listener (the internal interface)"}],
        "tags": [
            {"name": "internal", "description": "for application servers, on the outward listener (bearer token)"},
            {"name": "external", "description": "for other gateways, on the inward listener (mutual TLS)"},
        ],
        "security": [{"bearerToken": []}],
        "paths": {**_internal_paths(), **_external_paths()},
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearerToken": {
                    "type": "http", "scheme": "bearer",
                    "description": "an application's token, or the admin token",
                },
                "peerMutualTLS": {
                    "type": "mutualTLS",
                    "description": "a client certificate that chains to [tls] ca_certificates and names the "
                                   "infrastructure domain discovery gives for the Wire-Origin-Domain",
                },
            },
        },
    }
