// Command vfio-dra is the administrator's tool for the vfio.dra.dev driver.
package main

import (
	"os"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"

	"github.com/vfio-dra/vfio-dra-driver/pkg/inspect"
	"github.com/vfio-dra/vfio-dra-driver/pkg/plugin"
)

func main() {
	os.Exit(cli.Run(newCommand()))
}

func newCommand() *cobra.Command {
	root := &cobra.Command{
		Use:          "vfio-dra",
		Short:        "Inspect what the vfio.dra.dev kubelet plugin sees and publishes",
		SilenceUsage: true,
	}
	root.AddCommand(newInspectCommand())
	return root
}

func newInspectCommand() *cobra.Command {
	o := inspect.Options{
		SysfsRoot:  "/sys",
		ProcRoot:   "/proc",
		DriverName: plugin.DefaultDriverName,
		Output:     inspect.FormatTable,
	}
	cmd := &cobra.Command{
		Use:   "inspect",
		Short: "Show every PCI function and whether it is offered, or the ResourceSlices the plugin would publish",
		Long: `inspect reads a sysfs tree and the host's /proc the way the kubelet plugin
does.

With -o table it lists every PCI function with its IOMMU group (and the
group's size), its driver and the decision: offered, or why not.
With -o json or -o yaml it prints a v1 List of the resource.k8s.io/v1
ResourceSlices the plugin publishes for the node, which kubectl create -f -
accepts.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return inspect.Run(cmd.OutOrStdout(), cmd.ErrOrStderr(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.SysfsRoot, "sysfs-root", o.SysfsRoot, "Root of the sysfs tree to read.")
	f.StringVar(&o.ProcRoot, "proc-root", o.ProcRoot, "Where the host's /proc is: what the host uses (mounts, swap, routes, processes holding VFIO devices) is read there and never offered; the checkpoint's boot ID is compared with this boot's.")
	f.StringVar(&o.NodeName, "node-name", o.NodeName, "Name of the node the slices are for (required).")
	f.StringVar(&o.DriverName, "driver-name", o.DriverName, "DRA driver name.")
	f.StringVar(&o.ConfigFile, "config", o.ConfigFile, "DriverConfiguration file that filters the offered devices.")
	f.StringVar(&o.CheckpointFile, "checkpoint", o.CheckpointFile, "The plugin's checkpoint (e.g. /var/lib/kubelet/plugins/vfio.dra.dev/checkpoint.json): show functions moved to vfio by prepared claims with the driver they go back to, as the plugin publishes them.")
	f.StringVar(&o.HealthStateFile, "health-state", o.HealthStateFile, "The plugin's health state (e.g. /var/lib/kubelet/plugins/vfio.dra.dev/health.json): fatal AER errors since the plugin last looked show as taints, as the plugin publishes them.")
	f.StringVarP(&o.Output, "output", "o", o.Output, "Output format: table, json or yaml.")
	_ = cmd.MarkFlagRequired("node-name")
	return cmd
}
