"""Admin REST API for model prices (admin role only; other keys 403, no key 401).

    POST /api/v1/admin/prices   {model, input_per_1m, output_per_1m, cached_input_per_1m?, effective_from?}
                                upsert: same model + effective_from (default now) → 200 updated, else 201
    GET  /api/v1/admin/prices   every price row, newest first per model (?model=)

Prices are decimal strings in and out; a bad field is a 400 naming it in `error.param`.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import generics, status
from rest_framework.request import Request
from rest_framework.response import Response

from agentplatform.errors import request_id_of
from governance.permissions import IsAdminKey

from .models import ModelPrice
from .pricing import model_price_upsert
from .serializers import ModelPriceFilterSerializer, ModelPriceSerializer, ModelPriceUpsertSerializer


class ModelPriceListView(generics.GenericAPIView):
    permission_classes = [IsAdminKey]
    serializer_class = ModelPriceSerializer
    queryset = ModelPrice.objects.none()
    pagination_class = None

    @extend_schema(parameters=[OpenApiParameter("model", str, description="Only this model's prices.")],
                   responses={200: inline_serializer("ModelPriceList", {"data": ModelPriceSerializer(many=True)})})
    def get(self, request: Request) -> Response:
        query = ModelPriceFilterSerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        rows = ModelPrice.objects.order_by("model", "-effective_from")
        if query.validated_data.get("model"):
            rows = rows.filter(model=query.validated_data["model"])
        return Response({"data": ModelPriceSerializer(rows, many=True).data})

    @extend_schema(request=ModelPriceUpsertSerializer, responses={200: ModelPriceSerializer, 201: ModelPriceSerializer})
    def post(self, request: Request) -> Response:
        body = ModelPriceUpsertSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        row, created = model_price_upsert(**body.validated_data, source="api", actor=request.user.actor,
                                          request_id=request_id_of(request) or "")
        return Response(ModelPriceSerializer(row).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)
