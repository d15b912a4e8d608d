from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView

from project.demo import api, views

urlpatterns = [
    path("", views.search, name="search"),
    path("articles/<int:pk>/", views.article, name="article"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/", include(api.router.urls)),
    re_path(r"^api/", api.not_found),
]
