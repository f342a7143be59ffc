"""``plugin_args`` of the wrong kind get a message like the other configuration errors:
the argument, the value, and what it takes (not a raw ``ValueError`` from deep inside)."""

import pytest

from nipype_s3 import ConfigurationError, EC2Plugin

BASE = {"s3_prefix": "s3://my-bucket/runs"}


@pytest.mark.parametrize("args, message", [
    ({"max_instances": "two"}, r"plugin_args\['max_instances'\] must be a whole number"),
    ({"max_instances": 0}, r"plugin_args\['max_instances'\] must be at least 1, not 0"),
    ({"max_instances": 2.5}, r"must be a whole number, e\.g\. 4, not 2\.5"),
    ({"spot": "yes"}, r"plugin_args\['spot'\] must be True or False, not 'yes'"),
    ({"idle_timeout": "soon"}, r"plugin_args\['idle_timeout'\] must be a number"),
    ({"idle_timeout": -1}, r"plugin_args\['idle_timeout'\] must be at least"),
    ({"requirements": "nitime"}, r"plugin_args\['requirements'\] must be a list"),
    ({"tags": ["a"]}, r"plugin_args\['tags'\] must be a dict"),
    ({"agent_vcpus": "many"}, r"plugin_args\['agent_vcpus'\] must be a whole number.*or None"),
    ({"max_instances": True}, r"must be a whole number"),
    ({"n_procs": 8}, r"'n_procs' is MultiProc's.*'instance_type'.*'max_instances'"),
    ({"memory_gb": 32}, r"'memory_gb' is MultiProc's"),
])
def test_wrong_kinds_and_ranges_are_named(args, message):
    with pytest.raises(ConfigurationError, match=message):
        EC2Plugin(plugin_args=dict(BASE, **args))


def test_numbers_given_as_text_are_taken():
    plugin = EC2Plugin(plugin_args=dict(BASE, max_instances="3", idle_timeout="60",
                                        agent_mem_gb=8, security_group_ids=("sg-1",)))
    assert plugin.settings.max_instances == 3
    assert plugin.settings.idle_timeout == 60.0
    assert plugin.settings.agent_mem_gb == 8.0
    assert plugin.settings.security_group_ids == ["sg-1"]


def test_cost_report_bills_each_instance_at_least_a_minute(s3_inprocess, caplog):
    """"4 instance(s), 53 instance-s billed, ~$0.0057": the dollars used the 60 s
    minimum, the seconds did not. Both now go by what AWS bills (max(60, runtime) an
    instance), and cost.json has the raw seconds beside them."""
    import json
    import logging
    import types

    from nipype_s3.ec2.jobs import RunLayout
    from nipype_s3.ec2.pricing import estimate_cost
    from nipype_s3.s3.cas import ContentStore

    s3_inprocess.create_bucket(Bucket="my-bucket")
    plugin = EC2Plugin(plugin_args=BASE)
    plugin.run_id, plugin.started = "r1", 1000.0
    plugin.layout = RunLayout("my-bucket", "runs", "r1")
    plugin.s3 = s3_inprocess
    plugin.store = ContentStore(s3_inprocess, "my-bucket", "runs")
    launched = {f"i-{n}": {"type": "c6i.large", "launched": 1000.0, "spot": False,
                           "terminated": 1000.0 + t}
                for n, t in enumerate([10.0, 20.0, 15.0, 8.0])}
    plugin._fleets = {"c6i.large": types.SimpleNamespace(
        pool=types.SimpleNamespace(launched=launched))}
    with caplog.at_level(logging.INFO, logger="nipype.workflow"):
        plugin._write_cost_report()
    report = json.loads(s3_inprocess.get_object(Bucket="my-bucket",
                                                Key=plugin.layout.cost_key)["Body"].read())
    assert report["instance_seconds"] == 53.0 and report["billed_seconds"] == 240.0
    assert report["usd_estimate"] == pytest.approx(4 * estimate_cost("c6i.large", 60), abs=1e-4)
    assert [i["billed_seconds"] for i in report["instances"]] == [60.0] * 4
    assert "240 instance-s billed" in caplog.text


def test_the_run_stops_when_its_estimate_reaches_the_cap(tmp_path):
    import time
    import types

    from nipype import Node
    from nipype.interfaces.utility import IdentityInterface

    from nipype_s3.ec2.jobs import RunLayout
    from nipype_s3.exceptions import EC2Error
    from nipype_s3.plugins.ec2 import _Job

    plugin = EC2Plugin(plugin_args=dict(BASE, max_cost_usd=0.01))
    plugin.run_id, plugin.layout = "r1", RunLayout("my-bucket", "runs", "r1")
    launched = {"i-1": {"type": "c6i.large", "launched": time.time() - 3600, "spot": False}}
    plugin._fleets = {"c6i.large": types.SimpleNamespace(
        pool=types.SimpleNamespace(launched=launched), instance_type="c6i.large")}
    node = Node(IdentityInterface(fields=["a"]), "waiting", base_dir=str(tmp_path))
    job = _Job(0, "00000-waiting", node, node.output_dir(), time.time(), 1, 0.0)
    plugin._by_job_id[job.job_id] = job
    assert plugin._check_cost([job]) is True
    assert isinstance(plugin._fatal, EC2Error) and job.done
    assert "reached max_cost_usd=$0.01" in str(plugin._fatal)
    assert "1 node(s) not run: waiting" in str(plugin._fatal)


@pytest.mark.parametrize("node_args, message", [
    ({"instance_typ": "r6i.large"}, r"key 'instance_typ' \(did you mean 'instance_type'\?\)"),
    ("local", r"plugin_args must be a dict"),
    ({"instance_type": 5}, r"plugin_args\['instance_type'\] must be text, not 5"),
    ({"local": "yes"}, r"plugin_args\['local'\] must be True or False, not 'yes'"),
])
def test_a_nodes_own_plugin_args_are_checked_before_anything_runs(tmp_path, node_args,
                                                                  message):
    import networkx as nx
    from nipype import Node
    from nipype.interfaces.utility import Function

    node = Node(Function(input_names=["x"], output_names=["y"],
                         function=lambda x: x), "step", base_dir=str(tmp_path))
    node.plugin_args = node_args
    graph = nx.DiGraph()
    graph.add_node(node)
    with pytest.raises(ConfigurationError, match=message):
        EC2Plugin(plugin_args=BASE)._prerun_check(graph)


def test_other_batch_plugins_node_args_are_left_alone(tmp_path):
    """A workflow written for SGE (qsub_args, overwrite) runs unchanged."""
    from nipype_s3.remote.placement import check_node_args

    node = type("N", (), {"plugin_args": {"qsub_args": "-l h_vmem=4G", "overwrite": True},
                          "fullname": "wf.n"})()
    check_node_args(node, {"local": bool})


def test_plugin_args_that_are_not_a_dict_are_named():
    with pytest.raises(ConfigurationError, match=r"EC2Plugin\(plugin_args=\.\.\.\) takes a dict"):
        EC2Plugin(plugin_args="s3://my-bucket/runs")


def test_an_s3_prefix_with_an_empty_folder_name_is_refused():
    with pytest.raises(ConfigurationError, match="empty folder name"):
        EC2Plugin(plugin_args={"s3_prefix": "s3://my-bucket//x"})


def _fleet(vcpus=2):
    import types

    return types.SimpleNamespace(vcpus=vcpus)


def _waiting(n, started=False):
    import time
    import types

    return [types.SimpleNamespace(n_procs=1, started=time.time() if started else None,
                                  done=False) for _ in range(n)]


def test_instances_beyond_the_first_only_for_work_that_outlasts_a_boot():
    """0.1 s nodes made a run launch every instance it could, each billed its minute:
    another instance is wanted only while the queued work, at the runtimes seen so far,
    outlasts a boot."""
    plugin = EC2Plugin(plugin_args=dict(BASE, max_instances=8))
    waiting = _waiting(40)
    assert plugin._wanted(_fleet(), waiting, live=0) == 1  # nothing known: one instance
    plugin._boot_seconds = [30.0]
    plugin.timings = [{"node_started": 0.0, "node_finished": 0.1}] * 5  # 0.1 s nodes
    assert plugin._wanted(_fleet(), waiting, live=1) == 1  # 4 s of work: no boot is worth it
    plugin.timings = [{"node_started": 0.0, "node_finished": 10.0}] * 5  # 10 s nodes
    # 400 CPU-seconds queued, 2 vCPUs an instance, 30 s a boot: up to 6, capped by the
    # queue (20 instances' worth of CPUs) and by what runs already
    assert plugin._wanted(_fleet(), waiting, live=1) == 6
    assert plugin._wanted(_fleet(), waiting[:4], live=1) == 1  # 40 s of work
    assert plugin._wanted(_fleet(), waiting, live=7) == 7  # never fewer than are up


def test_a_long_running_job_counts_before_it_ends():
    """Long nodes: their runtime is known to be at least what they have run so far."""
    import time

    plugin = EC2Plugin(plugin_args=dict(BASE, max_instances=8))
    plugin._boot_seconds = [30.0]
    running = _waiting(2, started=True)
    for job in running:
        job.started = time.time() - 300  # running for 5 minutes
    plugin._outstanding = lambda: running
    assert plugin._runtime_estimate() >= 300
    assert plugin._wanted(_fleet(), running + _waiting(20), live=1) > 1


def test_nipypes_loop_turns_fast_while_aws_is_asked_at_its_own_pace():
    """An unchanged re-run slept nipype's poll interval (2 s) per level of the graph:
    the loop now turns every 0.05 s in graphs up to 2,000 nodes, and the events queue
    is read every 0.25 s while few jobs are out, at most every second otherwise."""
    import networkx as nx
    from nipype.pipeline.plugins.base import SGELikeBatchManagerBase

    plugin = EC2Plugin(plugin_args=BASE)
    seen = {}
    plugin._start_run = lambda: None
    plugin._finish_run = lambda: None
    original = SGELikeBatchManagerBase.run

    def fake_run(self, graph, config, updatehash=False):
        seen["poll"] = config["execution"]["poll_sleep_duration"]

    SGELikeBatchManagerBase.run = fake_run
    try:
        plugin.run(nx.DiGraph(), {"execution": {"poll_sleep_duration": 2.0}})
    finally:
        SGELikeBatchManagerBase.run = original
    assert seen["poll"] == 0.05
    plugin._outstanding = lambda: [object()] * 3
    assert plugin._poll_interval() == 0.25
    plugin._outstanding = lambda: [object()] * 50
    assert plugin._poll_interval() == 1.0
