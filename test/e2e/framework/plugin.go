package framework

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	drapb "k8s.io/kubelet/pkg/apis/dra/v1"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// DriverBinDirEnv is the environment variable that names the directory with the
// driver's own binaries ("make build" puts them into bin/; run.sh sets it).
const DriverBinDirEnv = "VFIO_E2E_DRIVER_BIN_DIR"

// DriverBinary returns the path of one of the driver's binaries, for example
// "vfio-kubelet-plugin". A missing binary is an error, never a reason to skip.
func DriverBinary(name string) (string, error) {
	dir := os.Getenv(DriverBinDirEnv)
	if dir == "" {
		return "", fmt.Errorf("%s is not set: it must name the directory that \"make build\" fills (run the tests with test/e2e/run.sh)", DriverBinDirEnv)
	}
	path := filepath.Join(dir, name)
	if _, err := os.Stat(path); err != nil {
		return "", fmt.Errorf("driver binary %s: %w (run \"make build\")", name, err)
	}
	return path, nil
}

// WaitForSocket waits until path exists and is a unix socket, for example the
// dra.sock of a kubelet plugin that p runs. It fails early when p exits.
func WaitForSocket(ctx context.Context, p *Process, path string, timeout time.Duration) error {
	return p.WaitReady(ctx, timeout, func(context.Context) error {
		info, err := os.Stat(path)
		if err != nil {
			return err
		}
		if info.Mode().Type() != fs.ModeSocket {
			return fmt.Errorf("%s is not a socket: %v", path, info.Mode())
		}
		return nil
	})
}

// dial connects to a gRPC server on a unix socket. gRPC connects lazily, so
// errors show up in the first call.
func dial(socketPath string) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient("unix://"+socketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", socketPath, err)
	}
	return conn, nil
}

// DRAPluginClient is a client for a kubelet plugin's DRA service (dra.sock),
// the calls the kubelet makes to prepare and unprepare claims.
type DRAPluginClient struct {
	drapb.DRAPluginClient
	conn *grpc.ClientConn
}

// NewDRAPluginClient returns a client for the DRA service on socketPath.
func NewDRAPluginClient(socketPath string) (*DRAPluginClient, error) {
	conn, err := dial(socketPath)
	if err != nil {
		return nil, err
	}
	return &DRAPluginClient{DRAPluginClient: drapb.NewDRAPluginClient(conn), conn: conn}, nil
}

// Close closes the connection.
func (c *DRAPluginClient) Close() error { return c.conn.Close() }

// RegisterPlugin does what the kubelet's plugin watcher does with a registration
// socket: it asks the plugin for its info, checks that it is a DRA plugin for
// driverName, and reports success. It returns the plugin's info, whose Endpoint
// is the DRA service socket.
func RegisterPlugin(ctx context.Context, registrationSocket, driverName string) (*registerapi.PluginInfo, error) {
	conn, err := dial(registrationSocket)
	if err != nil {
		return nil, err
	}
	defer func() { _ = conn.Close() }()
	client := registerapi.NewRegistrationClient(conn)
	info, err := client.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		return nil, fmt.Errorf("GetInfo on %s: %w", registrationSocket, err)
	}
	var problem error
	switch {
	case info.Type != registerapi.DRAPlugin:
		problem = fmt.Errorf("plugin type %q, want %q", info.Type, registerapi.DRAPlugin)
	case info.Name != driverName:
		problem = fmt.Errorf("plugin name %q, want %q", info.Name, driverName)
	case info.Endpoint == "":
		problem = errors.New("plugin reports no endpoint")
	}
	status := &registerapi.RegistrationStatus{PluginRegistered: problem == nil}
	if problem != nil {
		status.Error = problem.Error()
	}
	if _, err := client.NotifyRegistrationStatus(ctx, status); err != nil {
		return nil, fmt.Errorf("NotifyRegistrationStatus on %s: %w", registrationSocket, err)
	}
	if problem != nil {
		return nil, fmt.Errorf("register plugin on %s: %w", registrationSocket, problem)
	}
	return info, nil
}
