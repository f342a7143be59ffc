"""The ``nipype-s3`` command line.

Errors print as one clear line (exit status 1) unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .exceptions import ConfigurationError, NipypeS3Error

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nipype-s3",
        description="Nipype pipelines in AWS: S3 sinks and grabbers, containers and "
                    "workflows on EC2.")
    parser.add_argument("--version", action="version", version=f"nipype-s3 {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="run a real pipeline on an embedded S3 (no AWS account needed)",
        description="Start LocalCloud (an AWS account on 127.0.0.1), upload real NIfTI data, "
                    "and run a Nipype workflow: S3DataGrabber -> mean/tSNR/mask -> "
                    "S3DataSink, its nodes dispatched to EC2 instances with EC2Plugin. "
                    "Prints the output keys and the run's cost report.")
    demo.add_argument("--keep", metavar="DIR",
                      help="also keep a local copy of the outputs in DIR")
    demo.add_argument("--plugin", default=None, choices=["EC2", "Batch", "Linear",
                                                         "MultiProc"],
                      help="EC2 (EC2Plugin on LocalCloud instances, the default), Batch "
                           "(BatchPlugin on LocalCloud's Batch) or one of nipype's local "
                           "plugins")
    demo.add_argument("--backend", choices=["ec2", "batch"],
                      help="the same as --plugin EC2 or --plugin Batch")
    demo.add_argument("--image", default=None,
                      help="(Batch) the image the nodes run in (default: "
                           "nipype-s3-test/nipype:local, from tests/docker/build-images.sh)")
    demo.set_defaults(func=_cmd_demo)

    agent = sub.add_parser("agent", help="serve a run's jobs (what runs on each instance)",
                           description="The EC2Plugin agent: long-polls its run's jobs queue "
                                       "and runs the nodes it is sent.")
    agent.add_argument("--config", help="agent configuration (JSON file); default: the "
                                        "NIPYPE_S3_AGENT_CONFIG environment variable")
    agent.set_defaults(func=_cmd_agent)

    cleanup = sub.add_parser(
        "cleanup", help="delete what a run left: instances, queues, SSM parameters, uploads",
        description="Terminate the instances tagged nipype-s3:run=ID and the run's Batch "
                    "jobs (nipype-s3-ID-*, in every job queue), delete the run's SQS "
                    "queues (nipype-s3-ID-*) and SSM parameters (below /nipype-s3/runs/ID/), "
                    "and with --s3-prefix abort its incomplete multipart uploads and delete "
                    "its files. --all does so for every run found by any of these, also "
                    "runs whose instances are gone. For when a controller died.")
    which = cleanup.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", metavar="ID", help="the run id (printed when a run starts)")
    which.add_argument("--all", action="store_true",
                       help="every nipype-s3 run found by its instances, queues, SSM "
                            "parameters or (with --s3-prefix) folders in S3")
    cleanup.add_argument("--s3-prefix", help="also abort the incomplete uploads below "
                                             "s3_prefix/runs/ID/ and delete its files")
    cleanup.add_argument("--region", help="AWS region (default: your configured one)")
    cleanup.add_argument("--dry-run", action="store_true",
                         help="list everything that would go, delete nothing")
    cleanup.set_defaults(func=_cmd_cleanup)

    cost = sub.add_parser("cost", help="show a run's cost report",
                          description="Print the cost report EC2Plugin wrote for a run.")
    cost.add_argument("--run", metavar="ID", required=True)
    cost.add_argument("--s3-prefix", required=True, help="the run's s3_prefix")
    cost.add_argument("--json", action="store_true", help="print the raw JSON")
    cost.set_defaults(func=_cmd_cost)

    check = sub.add_parser(
        "check-image", help="check that a container image can run this controller's nodes",
        description="Pull IMAGE (unless it is here), print its Python, nipype, nibabel and "
                    "boto3 versions beside this controller's, and start the agent's "
                    "self-test in it as an instance would (EC2Plugin image=). Exit status "
                    "1 when the image cannot run this controller's nodes, saying why.")
    check.add_argument("image")
    check.add_argument("--no-pull", action="store_true",
                       help="only use an image already on this machine")
    check.set_defaults(func=_cmd_check_image)

    batch = sub.add_parser(
        "batch", help="make or remove the AWS Batch job queue BatchPlugin runs on",
        description="setup: create (or bring up to date) a managed compute environment and "
                    "a job queue named NAME, the job role nipype-s3-NAME-job (the agents' "
                    "least-privilege policy for --s3-prefix) and the instance role "
                    "nipype-s3-NAME-instance; running it again changes only what differs. "
                    "teardown: remove them (only what setup made). template: print the same "
                    "as a CloudFormation template.")
    batch.add_argument("action", choices=["setup", "teardown", "template"])
    batch.add_argument("--name", required=True, help="names the job queue, the compute "
                                                     "environment and the roles")
    batch.add_argument("--s3-prefix", help="(setup, template) the runs' s3_prefix the job "
                                           "role may use")
    batch.add_argument("--spot", action="store_true",
                       help="(setup, template) spot instances (default: on-demand)")
    batch.add_argument("--max-vcpus", type=int, default=256,
                       help="(setup, template) the most vCPUs running at once (default 256)")
    batch.add_argument("--subnets", nargs="+", default=[], metavar="ID",
                       help="(setup, template) default: the default VPC's")
    batch.add_argument("--security-groups", nargs="+", default=[], metavar="ID",
                       help="(setup, template) default: the default VPC's 'default' group")
    batch.add_argument("--data-bucket", action="append", default=[], metavar="NAME",
                       help="(setup, template) a bucket the nodes read or write themselves; "
                            "repeatable")
    batch.add_argument("--instance-types", nargs="+", default=["optimal"], metavar="TYPE",
                       help="(setup, template) instance types or families (default: "
                            "optimal; add e.g. g5 for nodes that ask for GPUs)")
    batch.add_argument("--region", help="AWS region (default: your configured one)")
    batch.set_defaults(func=_cmd_batch)

    policy = sub.add_parser(
        "policy", help="print the IAM policy the agents or the controller need",
        description="Print, as JSON, a least-privilege IAM policy for runs below "
                    "--s3-prefix: the agents' role (agent), the credentials of EC2Plugin's "
                    "controller (controller) or BatchPlugin's (batch-controller), or what "
                    "nipype-s3 batch setup/teardown need (batch-setup, with --name). The "
                    "docs show the same documents.")
    policy.add_argument("who", choices=["agent", "controller", "batch-controller",
                                        "batch-setup"])
    policy.add_argument("--s3-prefix", help="the runs' s3_prefix (all but batch-setup)")
    policy.add_argument("--name", help="(batch-setup, batch-controller; required) the "
                                       "Batch environment's name (nipype-s3 batch setup "
                                       "--name)")
    policy.add_argument("--run", metavar="PATTERN", default="*",
                        help="narrow it to runs whose id matches (e.g. '2026*'; default: all)")
    policy.add_argument("--data-bucket", action="append", default=[], metavar="NAME",
                        help="(agent) a bucket the nodes read or write themselves; repeatable")
    policy.add_argument("--ecr-repository", action="append", default=[], metavar="ARN",
                        help="(agent) an ECR repository whose images the instances pull "
                             "(EC2Plugin image=); repeatable")
    policy.add_argument("--agent-role-arn", default="arn:aws:iam::*:role/nipype-s3-agent",
                        help="(controller) the only role it may pass to instances")
    policy.set_defaults(func=_cmd_policy)
    return parser


def _cmd_check_image(args) -> int:
    from .images import check_image

    report = check_image(args.image, pull=not args.no_pull)
    theirs, ours = report["versions"], report["controller"]
    print(f"image {report['image']}")
    for name in ("python", "nipype", "nibabel", "boto3"):
        if name in theirs:
            here = f"   (controller: {ours[name]})" if name in ours else ""
            print(f"  {name:<8} {theirs[name]}{here}")
    if report["agent"]:
        print(f"  agent    {report['agent']}")
    for problem in report["problems"]:
        print(f"problem: {problem}")
    if report["problems"]:
        print("nipype-s3 check-image: this image cannot run this controller's nodes",
              file=sys.stderr)
        return 1
    print("nipype-s3 check-image: the image can run this controller's nodes")
    return 0


def _cmd_policy(args) -> int:
    import json

    from .ec2.jobs import parse_s3_prefix
    from .iam import agent_policy, batch_controller_policy, batch_setup_policy, controller_policy

    if args.who.startswith("batch-"):
        from .backends.batch.environment import checked_name

        if not args.name:
            raise ConfigurationError(f"nipype-s3 policy {args.who} needs --name: the Batch "
                                     "environment's name (its job queue and roles), as "
                                     "given to nipype-s3 batch setup.")
        checked_name(args.name)
    if args.who == "batch-setup":
        print(json.dumps(batch_setup_policy(args.name), indent=2))
        return 0
    if not args.s3_prefix:
        raise ConfigurationError(f"nipype-s3 policy {args.who} needs --s3-prefix: the runs' "
                                 "s3_prefix (s3://bucket/prefix).")
    bucket, prefix = parse_s3_prefix(args.s3_prefix)
    if args.who == "agent":
        doc = agent_policy(bucket, prefix, run=args.run, data_buckets=tuple(args.data_bucket),
                           ecr_repositories=tuple(args.ecr_repository))
    elif args.who == "batch-controller":
        doc = batch_controller_policy(
            bucket, prefix, run=args.run, job_queue=args.name,
            job_role_arn=f"arn:aws:iam::*:role/nipype-s3-{args.name}-job")
    else:
        doc = controller_policy(bucket, prefix, run=args.run,
                                agent_role_arn=args.agent_role_arn)
    print(json.dumps(doc, indent=2))
    return 0


def _cmd_batch(args) -> int:
    import json

    from .backends.batch import BatchEnvironment, cloudformation_template, setup, teardown
    from .ops import _client

    if args.action == "teardown":
        removed = teardown(args.name, lambda s: _client(s, args.region), say=print)
        print(f"nipype-s3 batch teardown: {len(removed)} removed" if removed else
              f"nipype-s3 batch teardown: nothing named {args.name} was there (removed "
              "already, or made with another --name or --region)")
        return 0
    if not args.s3_prefix:
        raise ConfigurationError(f"nipype-s3 batch {args.action} needs --s3-prefix: the "
                                 "runs' s3_prefix, which the job role may use.")
    env = BatchEnvironment(
        args.name, args.s3_prefix, spot=args.spot, max_vcpus=args.max_vcpus,
        subnets=tuple(args.subnets), security_groups=tuple(args.security_groups),
        data_buckets=tuple(args.data_bucket), instance_types=tuple(args.instance_types))
    if args.action == "template":
        print(json.dumps(cloudformation_template(env), indent=2))
        return 0
    made = setup(env, lambda s: _client(s, args.region), say=print)
    print("nipype-s3 batch setup: ready. Run with plugin_args "
          + json.dumps(dict(made, s3_prefix=args.s3_prefix, image="YOUR-IMAGE")))
    return 0


def _aws_error_line(exc) -> str:
    """One line for an error botocore raised, saying what to do."""
    import botocore.exceptions

    from .s3.errors import what_to_do

    hint = what_to_do(exc)
    if hint:
        return hint
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        return (f"AWS refused {exc.operation_name}: {err.get('Code')}: {err.get('Message')}. "
                "Check the credentials' permissions (nipype-s3 policy controller).")
    return f"{type(exc).__name__}: {exc}"


def _cmd_agent(args) -> int:
    from .agent.main import main as agent_main

    return agent_main(["--config", args.config] if args.config else [])


def _cmd_cleanup(args) -> int:
    from .ops import cleanup

    report = cleanup(run_id=args.run, all_runs=args.all, s3_prefix=args.s3_prefix,
                     region=args.region, dry_run=args.dry_run)
    if args.all:
        print(f"{len(report['runs'])} run(s) found"
              + (": " + ", ".join(report["runs"]) if report["runs"] else ""))
    verb = "would terminate" if args.dry_run else "terminated"
    print(f"{verb} {len(report['instances'])} instance(s)"
          + (": " + ", ".join(report["instances"]) if report["instances"] else ""))
    for kind, what, verbs in (("batch_jobs", "Batch job(s)", ("terminated", "would terminate")),
                              ("queues", "SQS queue(s)", ("deleted", "would delete")),
                              ("parameters", "SSM parameter(s)", ("deleted", "would delete")),
                              ("uploads", "incomplete multipart upload(s)",
                               ("aborted", "would abort")),
                              ("objects", "object(s)", ("deleted", "would delete"))):
        items = report[kind]
        if not items:
            continue
        print(f"{verbs[args.dry_run]} {len(items)} {what}")
        if args.dry_run or kind != "objects":
            for item in items:
                print(f"  {item}")
    return 0


def _cmd_cost(args) -> int:
    import json

    from .ops import load_cost_report

    report = load_cost_report(args.run, args.s3_prefix)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"run {report['run_id']}: {report['wall_seconds']:.0f} s wall, "
          f"{len(report['instances'])} instance(s), "
          f"{report.get('billed_seconds', report['instance_seconds']):.0f} instance-s billed "
          f"({report['instance_seconds']:.0f} s run), {report['busy_seconds']:.0f} s busy, "
          f"~${report['usd_estimate']:.4f}")
    print(f"jobs: {report['jobs_remote']} on EC2, {report['jobs_local']} on the controller; "
          f"{report['bytes_staged']} B staged, {report['bytes_fetched']} B fetched")
    for inst in report["instances"]:
        print(f"  {inst['instance_id']} {inst['type']}{' spot' if inst['spot'] else ''} "
              f"{inst['seconds']:.0f} s ~${inst['usd_estimate'] or 0:.4f}")
    print(report.get("note", ""))
    return 0


def _cmd_demo(args) -> int:
    from .demo import DEMO_IMAGE, run_demo

    backend = {"ec2": "EC2", "batch": "Batch", None: None}[args.backend]
    if backend and args.plugin and args.plugin != backend:
        raise ConfigurationError(f"demo: --backend {args.backend} and --plugin {args.plugin} "
                                 "disagree: give one of them.")
    plugin = backend or args.plugin or "EC2"
    if args.image and plugin != "Batch":
        raise ConfigurationError("demo: --image is for --backend batch (EC2Plugin's demo "
                                 "runs on the instances' own Python).")
    if args.image:
        from .remote.settings import checked_image

        checked_image(args.image, "demo --image")
    if args.keep:
        keep = os.path.abspath(args.keep)
        try:
            os.makedirs(keep, exist_ok=True)
            probe = os.path.join(keep, ".nipype-s3-demo-probe")
            open(probe, "w").close()
            os.unlink(probe)
        except OSError as exc:
            raise ConfigurationError(f"demo --keep {args.keep!r}: cannot write there "
                                     f"({exc.strerror}); give a folder you can write.") \
                from None
    return run_demo(keep=args.keep, plugin=plugin, image=args.image or DEMO_IMAGE)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    if args.debug:
        logging.basicConfig(level=logging.DEBUG)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("nipype-s3: interrupted", file=sys.stderr)
        return 130
    except (NipypeS3Error, OSError, RuntimeError) as exc:
        if args.debug:
            raise
        print(f"nipype-s3 {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # botocore's own, mostly: one line, a traceback with --debug
        import botocore.exceptions

        if args.debug or not isinstance(exc, (botocore.exceptions.BotoCoreError,
                                              botocore.exceptions.ClientError)):
            raise
        print(f"nipype-s3 {args.command}: error: {_aws_error_line(exc)} (--debug for "
              "details)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
