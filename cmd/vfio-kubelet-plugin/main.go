// Command vfio-kubelet-plugin is the node part of the vfio.dra.dev DRA
// driver: it publishes the node's PCI functions and binds allocated IOMMU
// groups to vfio-pci for the kubelet.
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/component-base/cli"
	cliflag "k8s.io/component-base/cli/flag"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/component-base/term"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/klog/v2"

	"github.com/vfio-dra/vfio-dra-driver/api/v1alpha1"
	"github.com/vfio-dra/vfio-dra-driver/pkg/healthcheck"
	"github.com/vfio-dra/vfio-dra-driver/pkg/metrics"
	"github.com/vfio-dra/vfio-dra-driver/pkg/plugin"
)

func main() {
	cmd, _ := newCommand()
	os.Exit(cli.Run(cmd))
}

type options struct {
	kubeconfig string
	// The client's rate limits: the kubelet prepares the claims of pods
	// that start together at once, and each prepare GETs its claim.
	kubeAPIQPS      float32
	kubeAPIBurst    int
	metricsAddress  string
	healthcheckPort int
	restConfig      *rest.Config
	configFile      string
	cfg             plugin.Config
	logging         *logsapi.LoggingConfiguration
}

// newCommand returns the command and the options its flags fill in.
func newCommand() (*cobra.Command, *options) {
	o := &options{
		cfg: plugin.Config{
			DriverName:     plugin.DefaultDriverName,
			NodeName:       os.Getenv("NODE_NAME"),
			SysfsRoot:      "/sys",
			DevRoot:        "/dev",
			HostDevRoot:    "/dev",
			CDIRoot:        "/var/run/cdi",
			RegistrarDir:   kubeletplugin.KubeletRegistryDir,
			ProcRoot:       "/proc",
			ModulesAlias:   modulesAlias(),
			RescanInterval: time.Minute,
			HealthInterval: plugin.DefaultHealthInterval,
			BindTimeout:    10 * time.Second,
		},
		kubeAPIQPS:   50,
		kubeAPIBurst: 100,
		logging:      logsapi.NewLoggingConfiguration(),
	}
	cmd := &cobra.Command{
		Use:          "vfio-kubelet-plugin",
		Short:        "Kubelet plugin of the vfio.dra.dev DRA driver",
		Args:         cobra.NoArgs,
		SilenceUsage: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := logsapi.ValidateAndApply(o.logging, nil); err != nil {
				return err
			}
			if err := o.complete(); err != nil {
				return err
			}
			// SIGTERM is how the kubelet and kubectl stop the plugin: shut
			// the gRPC services down and remove the sockets.
			ctx, stop := signal.NotifyContext(cmd.Context(), unix.SIGTERM, unix.SIGINT)
			defer stop()
			if o.metricsAddress != "" {
				// Listen here, so that a taken port fails the start.
				ln, err := net.Listen("tcp", o.metricsAddress)
				if err != nil {
					return fmt.Errorf("metrics bind address: %w", err)
				}
				o.cfg.Metrics = metrics.New()
				go func() {
					if err := o.cfg.Metrics.Serve(ctx, ln); err != nil {
						klog.FromContext(ctx).Error(err, "Serving metrics failed")
					}
				}()
			}
			if o.healthcheckPort >= 0 {
				if err := o.serveHealthchecks(ctx); err != nil {
					return err
				}
			}
			return plugin.Run(ctx, o.cfg)
		},
	}

	var fss cliflag.NamedFlagSets
	fs := fss.FlagSet("kubernetes")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "Kubeconfig file; empty uses the in-cluster configuration.")
	fs.StringVar(&o.cfg.NodeName, "node-name", o.cfg.NodeName, "Name of this node (default from $NODE_NAME).")
	fs.StringVar(&o.cfg.DriverName, "driver-name", o.cfg.DriverName, "DRA driver name.")
	fs.Float32Var(&o.kubeAPIQPS, "kube-api-qps", o.kubeAPIQPS, "Queries per second to the API server, on average.")
	fs.IntVar(&o.kubeAPIBurst, "kube-api-burst", o.kubeAPIBurst, "Queries to the API server in a burst above --kube-api-qps.")
	fs.StringVar(&o.metricsAddress, "metrics-bind-address", o.metricsAddress, "host:port for /metrics, /healthz and /readyz (e.g. :9400); empty serves none.")

	fs = fss.FlagSet("node")
	fs.StringVar(&o.cfg.SysfsRoot, "sysfs-root", o.cfg.SysfsRoot, "Where the host's /sys is mounted.")
	fs.StringVar(&o.cfg.DevRoot, "dev-root", o.cfg.DevRoot, "Where the host's /dev is mounted; the plugin waits for vfio group devices there.")
	fs.StringVar(&o.cfg.HostDevRoot, "host-dev-root", o.cfg.HostDevRoot, "The host's /dev as seen by the container runtime; written into CDI specs.")
	fs.StringVar(&o.cfg.CDIRoot, "cdi-root", o.cfg.CDIRoot, "Directory for CDI spec files.")
	fs.StringVar(&o.cfg.PluginDataDir, "plugin-data-dir", "", "Directory for dra.sock and the checkpoint (default /var/lib/kubelet/plugins/<driver-name>).")
	fs.StringVar(&o.cfg.RegistrarDir, "registrar-dir", o.cfg.RegistrarDir, "The kubelet's plugin registration directory.")
	fs.StringVar(&o.cfg.ProcRoot, "proc-root", o.cfg.ProcRoot, "Where the host's /proc is (hostPID, or the host's /proc mounted): its boot ID tells whether checkpointed claims are from this boot, and what the host uses (mounts, swap, routes, processes holding VFIO devices) is read there and never offered.")
	fs.StringVar(&o.cfg.ModulesAlias, "modules-alias", o.cfg.ModulesAlias, "The kernel's modules.alias, to find vfio variant drivers for driver \"auto\"; empty disables \"auto\".")
	fs.StringVar(&o.configFile, "config", "", "DriverConfiguration file that filters the offered devices.")
	fs.DurationVar(&o.cfg.RescanInterval, "rescan-interval", o.cfg.RescanInterval, "How often to read sysfs again; slices are republished only on change.")
	fs.DurationVar(&o.cfg.HealthInterval, "health-interval", o.cfg.HealthInterval, "How often to check device health cheaply (device and driver links, AER counters) and report it to the kubelet; config space and reset methods are checked at each rescan.")
	fs.DurationVar(&o.cfg.BindTimeout, "bind-timeout", o.cfg.BindTimeout, "Bound of each step of binding and giving back a function: one sysfs write, or the wait for its effect (driver link, VFIO device node).")
	fs.IntVar(&o.healthcheckPort, "healthcheck-port", -1, "TCP port of a grpc.health.v1 service for a liveness probe; it checks that the plugin answers on its kubelet sockets. Negative disables it.")

	logsapi.AddFlags(o.logging, fss.FlagSet("logging"))
	for _, f := range fss.FlagSets {
		cmd.Flags().AddFlagSet(f)
	}
	cols, _, _ := term.TerminalSize(cmd.OutOrStdout())
	cliflag.SetUsageAndHelpFunc(cmd, fss, cols)
	return cmd, o
}

// modulesAlias is the running kernel's modules.alias.
func modulesAlias() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return ""
	}
	return "/lib/modules/" + unix.ByteSliceToString(u.Release[:]) + "/modules.alias"
}

// serveHealthchecks listens on the health check port and answers there
// until ctx is done. A port that cannot be had fails the start.
func (o *options) serveHealthchecks(ctx context.Context) error {
	l, err := net.Listen("tcp", net.JoinHostPort("", strconv.Itoa(o.healthcheckPort)))
	if err != nil {
		return fmt.Errorf("health check port: %w", err)
	}
	sockets := healthcheck.Sockets{
		Registration: filepath.Join(o.cfg.RegistrarDir, o.cfg.DriverName+"-reg.sock"),
		DRA:          filepath.Join(o.cfg.PluginDataDir, "dra.sock"),
	}
	go func() {
		if err := healthcheck.Serve(ctx, l, sockets); err != nil {
			klog.FromContext(ctx).Error(err, "Health checks are no longer answered")
		}
	}()
	return nil
}

func (o *options) complete() error {
	if o.cfg.PluginDataDir == "" {
		o.cfg.PluginDataDir = kubeletplugin.KubeletPluginsDir + "/" + o.cfg.DriverName
	}
	if o.configFile != "" {
		c, err := v1alpha1.LoadDriverConfiguration(o.configFile)
		if err != nil {
			return err
		}
		o.cfg.DriverConfig = c
	}
	var restConfig *rest.Config
	var err error
	if o.kubeconfig != "" {
		restConfig, err = clientcmd.BuildConfigFromFlags("", o.kubeconfig)
	} else {
		restConfig, err = rest.InClusterConfig()
	}
	if err != nil {
		return fmt.Errorf("client configuration: %w", err)
	}
	if o.kubeAPIQPS <= 0 || o.kubeAPIBurst <= 0 {
		return fmt.Errorf("--kube-api-qps (%v) and --kube-api-burst (%d) must be positive", o.kubeAPIQPS, o.kubeAPIBurst)
	}
	restConfig.QPS, restConfig.Burst = o.kubeAPIQPS, o.kubeAPIBurst
	o.restConfig = restConfig
	o.cfg.KubeClient, err = kubernetes.NewForConfig(restConfig)
	return err
}
