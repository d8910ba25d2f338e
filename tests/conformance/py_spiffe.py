"""Conformance check of the Workload API with the unmodified Python `spiffe` package (py-spiffe).

Usage: SPIFFE_ENDPOINT_SOCKET=unix:///path python3 py_spiffe.py SPIFFE_ID
Exits 0 when every call works and returns what the agent serves for SPIFFE_ID; prints each step.
"""
import sys

from spiffe import WorkloadApiClient

want = sys.argv[1]
td = want.split("/")[2]
client = WorkloadApiClient()

svid = client.fetch_x509_svid()
assert str(svid.spiffe_id) == want, f"X509-SVID is {svid.spiffe_id}, want {want}"
assert len(svid.cert_chain) >= 1 and svid.private_key is not None
print("fetch_x509_svid:", svid.spiffe_id)

ctx = client.fetch_x509_context()
assert [str(s.spiffe_id) for s in ctx.x509_svids] == [want], ctx.x509_svids
bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
assert bundle is not None and len(bundle.x509_authorities) >= 1
print("fetch_x509_context: bundle of", bundle.trust_domain, "with", len(bundle.x509_authorities), "authorities")

bundles = client.fetch_x509_bundles()
assert bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain) is not None
print("fetch_x509_bundles: ok")

jwt = client.fetch_jwt_svid(audience={"db", "cache"})
assert str(jwt.spiffe_id) == want
assert set(jwt.audience) == {"db", "cache"}, jwt.audience
print("fetch_jwt_svid: audience", sorted(jwt.audience))

jwt_bundles = client.fetch_jwt_bundles()
jb = jwt_bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
assert jb is not None and len(jb.jwt_authorities) >= 1
print("fetch_jwt_bundles:", len(jb.jwt_authorities), "keys")

validated = client.validate_jwt_svid(jwt.token, "db")
assert str(validated.spiffe_id) == want
print("validate_jwt_svid: ok for", validated.spiffe_id)
try:
    client.validate_jwt_svid(jwt.token, "someone-else")
except Exception as e:  # the agent must refuse a token for another audience
    print("validate_jwt_svid (wrong audience) refused:", type(e).__name__)
else:
    raise AssertionError("a token for another audience was accepted")

client.close()
print("py-spiffe conformance: all checks passed")
