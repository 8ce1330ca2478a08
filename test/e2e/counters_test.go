package e2e

import (
	"path/filepath"
	"slices"
	"testing"

	"github.com/vfio-dra/vfio-dra-driver/test/e2e/framework"
)

// TestPluginWithoutSharedCounters: with the feature gate
// DRAPartitionableDevices off in the real kube-apiserver, which then drops
// shared counters from ResourceSlices, the plugin says so in its log,
// publishes only the devices whose IOMMU group has no other offered member
// (safe without counters), and keeps preparing and unpreparing claims.
func TestPluginWithoutSharedCounters(t *testing.T) {
	ctx := t.Context()
	cp := framework.StartControlPlane(t, framework.Options{APIServerArgs: []string{"--feature-gates=DRAPartitionableDevices=false"}})
	client := cp.Client
	node, err := framework.StartNode(ctx, cp, framework.NodeOptions{
		Name:       "node-1",
		ConfigFile: filepath.Join(repoRoot(t), "demo", "config.yaml"),
		PluginArgs: []string{"--rescan-interval=1s"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := node.Plugin.WaitForLog(ctx, publishTimeout, "the API server drops shared counters"); err != nil {
		t.Fatal(err)
	}
	published, err := framework.WaitForPool(ctx, client, node.Name, publishTimeout)
	if err != nil {
		t.Fatal(err)
	}
	var devices []string
	for _, s := range published {
		if len(s.Spec.SharedCounters) > 0 {
			t.Errorf("ResourceSlice %s has shared counters %v", s.Name, s.Spec.SharedCounters)
		}
		for _, d := range s.Spec.Devices {
			devices = append(devices, d.Name)
			if len(d.ConsumesCounters) > 0 {
				t.Errorf("device %s consumes counters %v", d.Name, d.ConsumesCounters)
			}
		}
	}
	slices.Sort(devices)
	// offeredOnDemoNode without the members of groups 2, 5 and 7.
	want := []string{"pci-0000-81-00-2", "pci-0000-81-00-3", "pci-0000-82-00-0", "pci-0000-84-00-0"}
	if !slices.Equal(devices, want) {
		t.Errorf("published devices %v, want only those of single-device groups %v", devices, want)
	}

	// The scheduler allocates a published device and the plugin prepares it.
	ns, err := framework.CreateNamespace(ctx, client, "nocounters")
	if err != nil {
		t.Fatal(err)
	}
	class := applyDeviceClass(ctx, t, cp)
	createNICClaimAndPod(ctx, t, client, ns, class)
	pod, err := framework.WaitForPodScheduled(ctx, client, ns, "vm", schedulingTimeout)
	if err != nil {
		t.Fatal(err)
	}
	claim := waitForReservedClaim(ctx, t, client, pod, "nic")
	checkAllocatedDevice(t, claim, node.Name, "nic", nicAddr)
	before := allDrivers(t, node)
	if _, err := node.Prepare(ctx, framework.ClaimRef(claim)); err != nil {
		t.Fatal(err)
	}
	checkDrivers(t, node, with(before, "vfio-pci", nicAddr))
	if err := node.Unprepare(ctx, framework.ClaimRef(claim)); err != nil {
		t.Fatal(err)
	}
	checkDrivers(t, node, before)
	if exited, err := node.Plugin.Exited(); exited {
		t.Errorf("the plugin exited: %v", err)
	}
}
