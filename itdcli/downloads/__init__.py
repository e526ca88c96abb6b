"""Helpers of `itdcli.download`: HTTP streaming with resume, safe tar extraction, the manifest, the Hub snapshot."""
