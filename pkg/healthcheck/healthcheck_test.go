package healthcheck_test

import (
	"context"
	"net"
	"path/filepath"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/klog/v2/ktesting"

	"github.com/vfio-dra/vfio-dra-driver/pkg/healthcheck"
)

// idle is a DRA driver with nothing to prepare.
type idle struct{}

func (idle) PrepareResourceClaims(context.Context, []*resourceapi.ResourceClaim) (map[types.UID]kubeletplugin.PrepareResult, error) {
	return map[types.UID]kubeletplugin.PrepareResult{}, nil
}

func (idle) UnprepareResourceClaims(context.Context, []kubeletplugin.NamespacedObject) (map[types.UID]error, error) {
	return map[types.UID]error{}, nil
}

func (idle) HandleError(context.Context, error, string) {}

func (idle) WatchHealthStatus(context.Context, chan<- kubeletplugin.DeviceHealthReport) error {
	return kubeletplugin.ErrHealthNotSupported
}

// TestCheck: a check through the probe's port passes while the real
// kubelet plugin helper serves both sockets and fails once it stopped.
func TestCheck(t *testing.T) {
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	dir := t.TempDir()
	const driver = "vfio.dra.dev"
	helper, err := kubeletplugin.Start(ctx, idle{},
		kubeletplugin.DriverName(driver),
		kubeletplugin.KubeClient(fake.NewClientset()),
		kubeletplugin.NodeName("node-a"),
		kubeletplugin.RegistrarDirectoryPath(dir),
		kubeletplugin.PluginDataDirectoryPath(dir),
		kubeletplugin.HealthService(false),
	)
	if err != nil {
		t.Fatal(err)
	}
	defer helper.Stop()

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() {
		served <- healthcheck.Serve(ctx, l, healthcheck.Sockets{
			Registration: filepath.Join(dir, driver+"-reg.sock"),
			DRA:          filepath.Join(dir, "dra.sock"),
		})
	}()
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	probe := healthpb.NewHealthClient(conn)

	check := func() healthpb.HealthCheckResponse_ServingStatus {
		t.Helper()
		resp, err := probe.Check(ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			t.Fatalf("Check: %v", err)
		}
		return resp.Status
	}
	if got := check(); got != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("with the plugin serving, the check says %v", got)
	}
	helper.Stop()
	if got := check(); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("with the plugin stopped, the check says %v", got)
	}
	cancel()
	if err := <-served; err != nil {
		t.Errorf("Serve after cancel: %v", err)
	}
}
