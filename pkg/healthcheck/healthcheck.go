// Package healthcheck serves the gRPC health protocol (grpc.health.v1) that
// a kubelet liveness probe calls. The kubelet plugin helper serves only the
// kubelet's own services on Unix sockets, which a probe cannot reach; this
// server answers for them: a check passes when the plugin answers on both
// sockets the kubelet uses, the registration service and the DRA service.
package healthcheck

import (
	"context"
	"errors"
	"fmt"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"k8s.io/klog/v2"
	drapb "k8s.io/kubelet/pkg/apis/dra/v1"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// Sockets are the plugin's Unix sockets that a check calls.
type Sockets struct {
	// Registration is the registrar socket in the kubelet's plugin
	// registry, e.g. /var/lib/kubelet/plugins_registry/vfio.dra.dev-reg.sock.
	Registration string
	// DRA is the DRA service socket, e.g.
	// /var/lib/kubelet/plugins/vfio.dra.dev/dra.sock.
	DRA string
}

// Server answers grpc.health.v1 checks by calling the plugin.
type Server struct {
	healthpb.UnimplementedHealthServer
	reg   registerapi.RegistrationClient
	dra   drapb.DRAPluginClient
	conns []*grpc.ClientConn
}

// New returns a Server for the plugin behind sockets. Connections are made
// on each check, so the plugin may start after the server.
func New(s Sockets) (*Server, error) {
	srv := &Server{}
	for _, path := range []string{s.Registration, s.DRA} {
		conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			srv.Close()
			return nil, fmt.Errorf("health check client for %s: %w", path, err)
		}
		srv.conns = append(srv.conns, conn)
	}
	srv.reg = registerapi.NewRegistrationClient(srv.conns[0])
	srv.dra = drapb.NewDRAPluginClient(srv.conns[1])
	return srv, nil
}

// Close closes the connections to the plugin.
func (s *Server) Close() {
	for _, c := range s.conns {
		_ = c.Close()
	}
}

// Check reports SERVING when the registration service tells the plugin's
// info and the DRA service answers an empty prepare (which changes nothing).
func (s *Server) Check(ctx context.Context, _ *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	logger := klog.FromContext(ctx)
	if _, err := s.reg.GetInfo(ctx, &registerapi.InfoRequest{}); err != nil {
		logger.Error(err, "Health check: the registration service does not answer")
		return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_NOT_SERVING}, nil
	}
	if _, err := s.dra.NodePrepareResources(ctx, &drapb.NodePrepareResourcesRequest{}); err != nil {
		logger.Error(err, "Health check: the DRA service does not answer")
		return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_NOT_SERVING}, nil
	}
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

// Serve answers health checks on l until ctx is done. It returns nil then,
// or the error that stopped serving.
func Serve(ctx context.Context, l net.Listener, s Sockets) error {
	hs, err := New(s)
	if err != nil {
		return err
	}
	defer hs.Close()
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	select {
	case <-ctx.Done():
		srv.Stop()
		if err := <-done; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			return fmt.Errorf("health check server: %w", err)
		}
		return nil
	case err := <-done:
		if errors.Is(err, grpc.ErrServerStopped) {
			return nil
		}
		return fmt.Errorf("health check server: %w", err)
	}
}
