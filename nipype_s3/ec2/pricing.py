"""Instance sizes and an on-demand price table for cost estimates (pure, offline).

Prices are Linux on-demand USD per hour in us-east-1 (AWS's published list prices;
other regions differ by a few percent). They make estimates, not bills: the cost report
says so. Unknown types use :func:`instance_shape` from ``DescribeInstanceTypes`` and no
price.
"""

from __future__ import annotations

import logging
import math

from ..exceptions import ConfigurationError

__all__ = ["ON_DEMAND_USD_PER_HOUR", "SHAPES", "hourly_price", "billed_seconds",
           "estimate_cost", "instance_shape"]

logger = logging.getLogger(__name__)

#: (vCPUs, memory GiB) of common types.
SHAPES: dict[str, tuple[int, float]] = {
    "t3.micro": (2, 1), "t3.small": (2, 2), "t3.medium": (2, 4), "t3.large": (2, 8),
    "m5.large": (2, 8), "m5.xlarge": (4, 16), "m5.2xlarge": (8, 32), "m5.4xlarge": (16, 64),
    "m6i.large": (2, 8), "m6i.xlarge": (4, 16), "m6i.2xlarge": (8, 32),
    "m6i.4xlarge": (16, 64), "m7i.large": (2, 8), "m7i.xlarge": (4, 16),
    "m7i.2xlarge": (8, 32),
    "c5.large": (2, 4), "c5.xlarge": (4, 8), "c5.2xlarge": (8, 16), "c5.4xlarge": (16, 32),
    "c6i.large": (2, 4), "c6i.xlarge": (4, 8), "c6i.2xlarge": (8, 16),
    "c6i.4xlarge": (16, 32), "c6i.8xlarge": (32, 64), "c7i.large": (2, 4),
    "c7i.xlarge": (4, 8), "c7i.2xlarge": (8, 16),
    "r5.large": (2, 16), "r5.xlarge": (4, 32), "r5.2xlarge": (8, 64),
    "r6i.large": (2, 16), "r6i.xlarge": (4, 32), "r6i.2xlarge": (8, 64),
    "g4dn.xlarge": (4, 16), "g4dn.2xlarge": (8, 32), "g5.xlarge": (4, 16),
    "p3.2xlarge": (8, 61),
}

ON_DEMAND_USD_PER_HOUR: dict[str, float] = {
    "t3.micro": 0.0104, "t3.small": 0.0208, "t3.medium": 0.0416, "t3.large": 0.0832,
    "m5.large": 0.096, "m5.xlarge": 0.192, "m5.2xlarge": 0.384, "m5.4xlarge": 0.768,
    "m6i.large": 0.096, "m6i.xlarge": 0.192, "m6i.2xlarge": 0.384, "m6i.4xlarge": 0.768,
    "m7i.large": 0.1008, "m7i.xlarge": 0.2016, "m7i.2xlarge": 0.4032,
    "c5.large": 0.085, "c5.xlarge": 0.17, "c5.2xlarge": 0.34, "c5.4xlarge": 0.68,
    "c6i.large": 0.085, "c6i.xlarge": 0.17, "c6i.2xlarge": 0.34, "c6i.4xlarge": 0.68,
    "c6i.8xlarge": 1.36, "c7i.large": 0.08925, "c7i.xlarge": 0.1785, "c7i.2xlarge": 0.357,
    "r5.large": 0.126, "r5.xlarge": 0.252, "r5.2xlarge": 0.504,
    "r6i.large": 0.126, "r6i.xlarge": 0.252, "r6i.2xlarge": 0.504,
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g5.xlarge": 1.006, "p3.2xlarge": 3.06,
}


def smallest_fitting(n_procs: int, mem_gb: float, like: str = "") -> str | None:
    """The cheapest type of the table with ``n_procs`` vCPUs and ``mem_gb`` GiB (GPU
    types left out), of the family of ``like`` (``c6i`` for ``c6i.large``) among equally
    cheap ones; ``None`` if none has them."""
    family = like.split(".")[0]
    fits = [t for t, (cpus, mem) in SHAPES.items()
            if cpus >= n_procs and mem >= mem_gb and not t.startswith(("g", "p"))]
    ranked = sorted(fits, key=lambda t: (ON_DEMAND_USD_PER_HOUR.get(t, 1e9),
                                         t.split(".")[0] != family, t))
    return ranked[0] if ranked else None


def hourly_price(instance_type: str) -> float | None:
    """On-demand USD per hour, or None when the type is not in the table."""
    return ON_DEMAND_USD_PER_HOUR.get(instance_type)


def billed_seconds(seconds: float) -> float:
    """Linux per-second billing with a one-minute minimum."""
    return max(60.0, math.ceil(max(0.0, seconds)))


def estimate_cost(instance_type: str, seconds: float, *, spot: bool = False) -> float | None:
    """Estimated USD for one instance that ran ``seconds`` (spot: ~30% of on-demand)."""
    price = hourly_price(instance_type)
    if price is None:
        return None
    factor = 0.3 if spot else 1.0
    return round(price * factor * billed_seconds(seconds) / 3600.0, 6)


def instance_shape(instance_type: str, ec2_client=None) -> tuple[int, float]:
    """(vCPUs, memory GiB) of a type: from the table, else ``DescribeInstanceTypes``.

    A type the region does not offer (a typo, or a type of another region) raises
    :class:`~nipype_s3.ConfigurationError` naming it; any other refusal of the request
    (a policy without ``ec2:DescribeInstanceTypes``) is logged, and the run goes on with
    2 vCPUs and 4 GiB per instance.
    """
    if instance_type in SHAPES:
        return SHAPES[instance_type]
    if ec2_client is not None:
        import botocore.exceptions

        try:
            info = ec2_client.describe_instance_types(InstanceTypes=[instance_type])
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            region = ec2_client.meta.region_name
            if error.get("Code") == "InvalidInstanceType":
                raise ConfigurationError(
                    f"Instance type {instance_type!r} does not exist in {region} "
                    f"({error.get('Message') or 'InvalidInstanceType'}). Check the "
                    "instance_type (e.g. 'c6i.2xlarge'), in plugin_args or a node's "
                    "plugin_args.") from exc
            logger.warning("could not look up instance type %s in %s (%s); packing jobs "
                           "as if it had 2 vCPUs and 4 GiB", instance_type, region,
                           error.get("Code") or exc)
            return (2, 4.0)
        found = info.get("InstanceTypes") or []
        if found:
            return (int(found[0]["VCpuInfo"]["DefaultVCpus"]),
                    found[0]["MemoryInfo"]["SizeInMiB"] / 1024.0)
    return (2, 4.0)
